"""Several models in one server: declared by flags and a TOML file, routed in each dialect's own
way, isolated from one another, and reported one by one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, _bert_with_labels, client_session, wait_until
from pipeserve.front.config import ConfigError
from pipeserve.front.deployment import load_deployment
from test_streaming import chat_model  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def retrieval(tiny_models: dict[str, Path], chat_model: Path,  # noqa: F811
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The retrieval stack in one server: an embedder and a chat model by flag, a re-ranker
    from a TOML file with a setting of its own."""
    folder = tmp_path_factory.mktemp("multi")
    reranker = _bert_with_labels(folder / "reranker", ["score"], "sequence")
    config = folder / "models.toml"
    config.write_text(f'[models.rerank]\nmodel = "{reranker}"\nmax_batch_size = 4\n')
    server = Server(["--model", f"embed={tiny_models['feature-extraction']}", "--model", f"chat={chat_model}",
                     "--task", "chat=text-generation", "--config", str(config)])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _openai(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", timeout=60, max_retries=0)


def _post(server: Server, path: str, document: Any) -> Any:
    return server.request("POST", path, json.dumps(document), {"Content-Type": "application/json"})


@pytest.mark.timeout(120)
def test_the_openai_sdk_picks_each_model_by_name(retrieval: Server) -> None:
    import openai

    client = _openai(retrieval)
    assert [model.id for model in client.models.list().data] == ["embed", "chat", "rerank"]
    vectors = client.embeddings.create(model="embed", input=["a cat", "a dog"])
    assert len(vectors.data) == 2 and vectors.model == "embed"
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0)
    assert chat.model == "chat" and chat.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError) as unknown:
        client.embeddings.create(model="nope", input="x")
    assert unknown.value.code == "model_not_found" and "'embed', 'chat', 'rerank'" in unknown.value.message
    with pytest.raises(openai.BadRequestError, match="needs a text-generation model"):
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    assert client.models.retrieve("rerank").id == "rerank"


@pytest.mark.timeout(120)
def test_langchain_embeds_with_one_model_and_answers_with_another(retrieval: Server) -> None:
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    base = f"http://127.0.0.1:{retrieval.port}/v1"
    embeddings = OpenAIEmbeddings(model="embed", base_url=base, api_key="unused", check_embedding_ctx_length=False)
    assert [len(vector) for vector in embeddings.embed_documents(["a cat", "a dog"])] == [32, 32]
    llm = ChatOpenAI(model="chat", base_url=base, api_key="unused", max_tokens=3, temperature=0)
    assert isinstance(llm.invoke("hi").content, str)


@pytest.mark.timeout(120)
def test_inference_client_tei_and_tgi_under_the_models_name(retrieval: Server) -> None:
    from huggingface_hub import InferenceClient

    base = f"http://127.0.0.1:{retrieval.port}"
    embedder = InferenceClient(model=f"{base}/models/embed", timeout=60)
    assert embedder.feature_extraction("a cat").shape[-1] == 32
    ranked = _post(retrieval, "/models/rerank/rerank", {"query": "cat", "texts": ["a cat", "a car"]})
    assert ranked.status == 200 and sorted(item["index"] for item in ranked.json()) == [0, 1]
    generated = InferenceClient(model=f"{base}/models/chat", timeout=60).text_generation(
        "the", max_new_tokens=3, do_sample=False)
    assert isinstance(generated, str)
    assert _post(retrieval, "/models/chat/generate", {"inputs": "the", "parameters": {"max_new_tokens": 2}}
                 ).status == 200
    # The root routes serve the first model declared; an unknown name is a 404 in the route's envelope.
    assert _post(retrieval, "/embed", {"inputs": "a cat"}).status == 200
    missing = _post(retrieval, "/models/nope/embed", {"inputs": "x"})
    assert missing.status == 404 and missing.json()["error_type"] and "not served here" in missing.json()["error"]
    assert _post(retrieval, "/models/embed/predict", {"inputs": "x"}).status == 400  # an embedder does not classify


@pytest.mark.timeout(120)
def test_each_model_is_reported_with_its_settings_and_a_model_label(retrieval: Server) -> None:
    info = retrieval.info()
    assert list(info["models"]) == ["embed", "chat", "rerank"]
    assert info["models"]["rerank"]["settings"]["max_batch_size"] == 4  # its own table's setting
    assert info["models"]["embed"]["settings"]["max_batch_size"] != 4
    assert info["models"]["chat"]["task"] == "text-generation" and info["models"]["chat"]["loaded"]
    assert info["served_model_name"] == "embed"  # the first model's, at the top, as with one model
    ready = retrieval.request("GET", "/ready").json()
    assert ready["models"] == {"embed": "ready", "chat": "ready", "rerank": "ready"}
    before = retrieval.request("GET", "/stats").json()["requests"]
    _post(retrieval, "/models/rerank/predict", {"inputs": "x"})
    _post(retrieval, "/models/rerank", {"inputs": "x"})
    # Both ask the model: the page's figures count them (probes and scrapes they do not).
    assert retrieval.request("GET", "/stats").json()["requests"] == before + 2
    metrics = retrieval.request("GET", "/metrics").body.decode()
    assert 'pipeserve_worker_up{model="rerank",worker="0"} 1.0' in metrics
    assert 'route="/models/{model_name}/predict"' in metrics and 'model="rerank"' in metrics
    assert "model=rerank" in retrieval.log  # the access log names it
    document = retrieval.request("GET", "/openapi.json").json()
    field = document["components"]["schemas"]["EmbeddingsRequest"]["properties"]["model"]["anyOf"][0]
    assert field["enum"] == ["embed", "chat", "rerank"]  # with several, the body's model names one of them
    path = document["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["schema"]
    assert path["enum"] == ["embed", "chat", "rerank"]


async def _load(server: Server, path: str, document: Any, count: int) -> list[int]:
    async with client_session() as session:
        async def one() -> int:
            async with session.post(f"http://127.0.0.1:{server.port}{path}", json=document) as response:
                await response.read()
                return response.status
        return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.timeout(180)
def test_a_crash_of_one_models_worker_does_not_touch_the_others(retrieval: Server) -> None:
    victim = retrieval.info()["models"]["rerank"]["workers"][0]["pid"]

    async def under_load() -> tuple[list[int], list[int]]:
        embeds = asyncio.ensure_future(_load(retrieval, "/models/embed/embed", {"inputs": ["a cat"] * 4}, 24))
        chats = asyncio.ensure_future(_load(retrieval, "/v1/chat/completions", {
            "model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, 12))
        await asyncio.sleep(0)  # let the first requests go out before the kill
        os.kill(victim, signal.SIGKILL)
        return await embeds, await chats

    embeds, chats = asyncio.run(under_load())
    assert set(embeds) == {200} and set(chats) == {200}
    wait_until(lambda: retrieval.info()["models"]["rerank"]["workers"][0]["pid"] not in (victim, None)
               and retrieval.request("GET", "/ready").status == 200, 60)
    assert _post(retrieval, "/models/rerank/rerank", {"query": "q", "texts": ["a"]}).status == 200
    assert retrieval.info()["models"]["embed"]["workers"][0]["restarts"] == 0


@pytest.mark.timeout(120)
def test_a_model_that_cannot_load_is_reported_while_the_others_serve(tiny_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()  # no config.json: it cannot load
    server = Server(["--model", f"good={tiny_models['feature-extraction']}", "--model",
                     f"broken={tmp_path / 'broken'}", "--max-restarts", "1"])
    try:
        server.wait_listening()
        wait_until(lambda: server.request("GET", "/ready").status == 200, 90)
        ready = server.request("GET", "/ready").json()
        assert ready["models"]["good"] == "ready" and "broken" in ready["models"] and ready["models"]["broken"] != "ready"
        assert _post(server, "/models/good/embed", {"inputs": "x"}).status == 200
        refused = _post(server, "/models/broken/embed", {"inputs": "x"})
        assert refused.status == 503 and "cannot be served" in refused.json()["error"]
        assert server.info()["models"]["broken"]["failed"]
    finally:
        server.stop()


# --- declaring them ------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_one_model_is_declared_as_before(tmp_path: Path) -> None:
    single = load_deployment(["--model", str(tmp_path), "--task", "fill-mask"], environ={})
    (entry,) = single.models
    assert entry.name == tmp_path.name and entry.config.model == str(tmp_path) and entry.config.task == "fill-mask"
    hub = load_deployment(["--model", "org/some-model"], environ={})
    assert hub.models[0].name == "org/some-model"  # a hub id's slash is not a NAME=


@pytest.mark.timeout(10)
def test_several_models_and_their_tables(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text('[models.chat]\nmodel = "/m/chat"\nworkers = 1\ndtype = "bfloat16"\n')
    deployment = load_deployment(["--model", "embed=/m/embed", "--workers", "2", "--config", str(config),
                                  "--task", "embed=feature-extraction"], environ={})
    embed, chat = deployment.models
    assert (embed.name, embed.config.model, embed.config.task, embed.config.workers) == (
        "embed", "/m/embed", "feature-extraction", 2)
    assert (chat.name, chat.config.workers, chat.config.dtype) == ("chat", 1, "bfloat16")
    assert embed.config.served_model_name == "embed" and deployment.config.model is None


@pytest.mark.parametrize(("argv", "table", "message"), [
    (["--model", "a=/x", "--model", "/y"], "", "name each one"),
    (["--model", "a=/x", "--model", "a=/y"], "", "declared twice"),
    (["--model", "a=/x", "--task", "b=fill-mask"], "", "names one of a"),
    (["--model", "a=/x"], '[models.b]\nmodel = "/y"\nport = 9\n', "is the server's"),
    (["--model", "a=/x"], '[models.b]\nmodel = "/y"\nworkerz = 1\n', "no such model setting"),
    (["--model", "a=/x"], '[models.b]\nworkers = 1\n', "needs a model"),
    (["--model", "a=/x"], '[models.b]\nmodel = "/y"\nworkers = "many"\n', "workers"),
    (["--model", "a=/x"], 'port = 9\n', "unknown table or key"),
])
@pytest.mark.timeout(10)
def test_contradictions_are_refused_with_what_is_wrong(tmp_path: Path, argv: list[str], table: str,
                                                       message: str) -> None:
    if table:
        (tmp_path / "models.toml").write_text(table)
        argv = [*argv, "--config", str(tmp_path / "models.toml")]
    with pytest.raises(ConfigError, match=message):
        load_deployment(argv, environ={})


# --- more models than room; reloading ------------------------------------------------------------------


def _echo_models(a_settings: str = "") -> str:
    """A --config of two echo pipelines, a and b; `a_settings`: a TOML line of a's own."""
    a = f"{a_settings}\n" if a_settings else ""
    return f'[models.a]\npipeline = "custom_pipelines:make"\n{a}[models.b]\npipeline = "custom_pipelines:make"\n'


def _loaded(server: Server) -> dict[str, bool]:
    return {name: model["loaded"] for name, model in server.info()["models"].items()}


@pytest.mark.timeout(180)
def test_more_models_than_room_load_on_demand_and_the_least_recently_used_unloads(
        tiny_models: dict[str, Path]) -> None:
    embedder, classifier = tiny_models["feature-extraction"], tiny_models["text-classification"]
    server = Server(["--model", f"a={embedder}", "--model", f"b={classifier}", "--model", f"c={embedder}",
                     "--max-loaded-models", "2"]).wait_ready()
    try:
        assert _loaded(server) == {"a": True, "b": True, "c": False}  # the first two, at start
        assert server.request("GET", "/ready").json()["models"]["c"] == "unloaded"  # and /ready is 200
        assert _post(server, "/models/b/predict", {"inputs": "x"}).status == 200
        assert _post(server, "/models/a/embed", {"inputs": "x"}).status == 200  # b is now the least recent
        loaded_on_demand = _post(server, "/models/c/embed", {"inputs": "x"})  # waits while c loads
        assert loaded_on_demand.status == 200, loaded_on_demand.body
        assert _loaded(server) == {"a": True, "b": False, "c": True}
        assert "unloading model 'b': the least recently used, to make room for 'c'" in server.log
        metrics = server.request("GET", "/metrics").body.decode()
        assert 'pipeserve_model_unloads_total{model="b",reason="lru"} 1.0' in metrics
        assert 'pipeserve_model_loads_total{model="c",reason="request"} 1.0' in metrics
        assert 'pipeserve_model_loaded{model="b"} 0.0' in metrics
        assert _post(server, "/models/b/predict", {"inputs": "x"}).status == 200  # and back again
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_keep_alive_unloads_an_idle_model_and_its_next_request_loads_it(tiny_models: dict[str, Path]) -> None:
    server = Server(["--model", str(tiny_models["feature-extraction"]), "--keep-alive", "1s"]).wait_ready()
    try:
        assert server.post_json({"inputs": "x"}).status == 200
        wait_until(lambda: not server.info()["models"]["feature-extraction"]["loaded"], 30)
        assert server.request("GET", "/ready").status == 200  # unloaded on purpose is not unready
        assert server.post_json({"inputs": "x"}).status == 200  # loads again, the request waits
        assert 'reason="keep_alive"' in server.request("GET", "/metrics").body.decode()
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_sighup_reloads_the_models_under_load_without_failing_a_request(tiny_models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    import threading

    embedder, classifier = tiny_models["feature-extraction"], tiny_models["text-classification"]
    config = tmp_path / "models.toml"
    config.write_text(f'[models.a]\nmodel = "{embedder}"\n[models.b]\nmodel = "{classifier}"\n')
    server = Server(["--config", str(config)]).wait_ready()
    statuses: list[int] = []
    done = threading.Event()

    def load() -> None:  # steady traffic to the model that is replaced, through the reload
        while not done.is_set():
            statuses.append(_post(server, "/models/a/embed", {"inputs": ["a cat", "a dog"]}).status)

    traffic = threading.Thread(target=load)
    traffic.start()
    try:
        wait_until(lambda: len(statuses) >= 5, 30)
        # a: changed (its own batch size); b: removed; c: added.
        config.write_text(f'[models.a]\nmodel = "{embedder}"\nmax_batch_size = 4\n'
                          f'[models.c]\nmodel = "{classifier}"\n')
        server.signal(signal.SIGHUP)
        wait_until(lambda: list(server.info()["models"]) == ["a", "c"]
                   and server.info()["models"]["a"]["settings"]["max_batch_size"] == 4
                   and server.request("GET", "/ready").status == 200, 120)
        served = len(statuses)
        wait_until(lambda: len(statuses) >= served + 5, 30)  # and the new a serves the traffic
    finally:
        done.set()
        traffic.join(60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert _post(server, "/models/c/predict", {"inputs": "x"}).status == 200
    assert _post(server, "/models/b/predict", {"inputs": "x"}).status == 404
    assert "reload: model 'a' replaced" in server.log and "reload: model 'b' removed" in server.log
    server.stop()


@pytest.mark.timeout(120)
def test_a_model_with_work_under_way_is_never_unloaded(tmp_path: Path) -> None:
    import threading

    config = tmp_path / "models.toml"
    config.write_text(_echo_models())
    server = Server(["--config", str(config), "--max-loaded-models", "1"]).wait_ready()
    gate = tmp_path / "gate"
    held: list[int] = []
    try:
        assert _loaded(server) == {"a": True, "b": False}
        worker = threading.Thread(target=lambda: held.append(_post(server, "/models/a", {"inputs": f"WAIT:{gate}"}).status))
        worker.start()
        wait_until(lambda: server.info()["models"]["a"]["counters"]["in_flight"] == 1, 30)
        refused = _post(server, "/models/b", {"inputs": "x"})  # the one loaded model is busy: no room
        assert refused.status == 503 and "has work under way" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        assert _loaded(server) == {"a": True, "b": False}
        gate.touch()
        worker.join(30)
        assert held == [200]
        assert _post(server, "/models/b", {"inputs": "x"}).status == 200  # a is idle now: it makes room
        assert _loaded(server) == {"a": False, "b": True}
    finally:
        gate.touch()
        server.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("models", [1, 2])
def test_a_reload_whose_replacement_cannot_load_keeps_the_old_model_and_later_reloads_apply(
        tiny_models: dict[str, Path], tmp_path: Path, models: int) -> None:
    """SIGHUP with a model changed to a folder that cannot load: the old one serves on (alone,
    the server does not give up; beside another, the reload does not fail halfway), and a later
    SIGHUP is still read and applied."""
    embedder, classifier = tiny_models["feature-extraction"], tiny_models["text-classification"]
    (tmp_path / "broken").mkdir()  # no config.json: it cannot load
    other = f'[models.b]\nmodel = "{classifier}"\n' if models == 2 else ""
    config = tmp_path / "models.toml"
    config.write_text(f'[models.a]\nmodel = "{embedder}"\n' + other)
    server = Server(["--config", str(config), "--max-restarts", "0"]).wait_ready()
    try:
        config.write_text(f'[models.a]\nmodel = "{tmp_path / "broken"}"\n' + other)
        server.signal(signal.SIGHUP)
        server.wait_log("reload: model 'a''s new settings do not serve", 90)
        assert _post(server, "/models/a/embed", {"inputs": "x"}).status == 200
        assert server.request("GET", "/ready").status == 200
        config.write_text(f'[models.a]\nmodel = "{embedder}"\nmax_batch_size = 4\n' + other)
        server.signal(signal.SIGHUP)
        wait_until(lambda: server.info()["models"]["a"]["settings"]["max_batch_size"] == 4
                   and server.request("GET", "/ready").status == 200, 90)
        assert _post(server, "/models/a/embed", {"inputs": "x"}).status == 200
        assert "Traceback" not in server.log and server.process.poll() is None
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_bad_request_timeout_header_leaves_its_model_free_to_unload(tmp_path: Path) -> None:
    """A request refused for its X-Request-Timeout header (400) never held its model: the model
    is not counted busy afterwards, so another model's request can unload it."""
    config = tmp_path / "models.toml"
    config.write_text(_echo_models())
    server = Server(["--config", str(config), "--max-loaded-models", "1"]).wait_ready()
    try:
        assert _loaded(server) == {"a": True, "b": False}
        for _ in range(2):
            bad = server.request("POST", "/models/a", json.dumps({"inputs": "x"}),
                                 {"Content-Type": "application/json", "X-Request-Timeout": "soon"})
            assert bad.status == 400
        assert _post(server, "/models/b", {"inputs": "x"}).status == 200  # a was idle: it made room
        assert _loaded(server) == {"a": False, "b": True}
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_keep_alive_first_declared_by_a_reload_unloads_the_idle_model(tmp_path: Path) -> None:
    config = tmp_path / "models.toml"
    config.write_text(_echo_models())
    server = Server(["--config", str(config)]).wait_ready()
    try:
        assert _loaded(server) == {"a": True, "b": True}
        config.write_text(_echo_models('keep_alive = "1s"'))
        server.signal(signal.SIGHUP)
        server.wait_log("reload: model 'a' replaced", 60)
        wait_until(lambda: _loaded(server) == {"a": False, "b": True}, 30, message="a unloaded after 1 s idle")
        assert _post(server, "/models/a", {"inputs": "x"}).status == 200  # and loads again on demand
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_request_waiting_behind_a_reload_is_answered_at_its_deadline(tmp_path: Path) -> None:
    """A reload holds the models while a replacement loads (here held at a gate): a request that
    must load another model meanwhile gets its 504 at its own deadline, not when the reload ends."""
    gate, armed = tmp_path / "gate", tmp_path / "armed"
    config = tmp_path / "models.toml"
    config.write_text(_echo_models())
    server = Server(["--config", str(config), "--max-loaded-models", "1"],
                    env={"TEST_LOAD_GATE": str(gate), "TEST_LOAD_GATE_ARMED": str(armed)}).wait_ready()
    try:
        armed.touch()  # loads from now on wait for the gate
        config.write_text(_echo_models('max_batch_size = 4'))
        server.signal(signal.SIGHUP)
        server.wait_log("SIGHUP received", 30)
        wait_until(lambda: " starting" in server.log.split("SIGHUP received", 1)[-1], 30,
                   message="the replacement's model process starting")
        late = server.request("POST", "/models/b", json.dumps({"inputs": "x"}),
                              {"Content-Type": "application/json", "X-Request-Timeout": "1"}, timeout=30)
        assert late.status == 504 and "deadline" in late.json()["error"]
        assert not gate.exists()  # answered while the reload still waits
        gate.touch()
        wait_until(lambda: server.info()["models"]["a"]["settings"]["max_batch_size"] == 4, 60)
        assert _loaded(server) == {"a": True, "b": False}
    finally:
        gate.touch()
        server.stop()
