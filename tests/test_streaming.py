"""Streamed generation against a real `python -m pipeserve` with a tiny GPT-2 that has a chat
template: TGI's routes through huggingface_hub, OpenAI's through the openai SDK, continuous
batching under concurrent streams, an abandoned stream, a deadline and a crash mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from huggingface_hub import InferenceClient

from conftest import Server, save_gpt2, wait_until

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


@pytest.fixture(scope="module")
def chat_model(task_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2's tokenizer with a chat template, and room for 1024 positions."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    folder.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return save_gpt2(folder, tokenizer, n_positions=1024)


@pytest.fixture(scope="module")
def generator(chat_model: Path) -> Iterator[Server]:
    server = Server(["--model", str(chat_model), "--max-running-sequences", "8"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _hf(server: Server) -> InferenceClient:
    return InferenceClient(model=f"http://127.0.0.1:{server.port}", timeout=60)


def _openai(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


LONG = {"max_new_tokens": 12, "ignore_eos": True}


def test_inference_client_text_generation_plain_details_and_streamed(generator: Server) -> None:
    client = _hf(generator)
    text = client.text_generation("the good movie", max_new_tokens=5, do_sample=False)
    detailed = client.text_generation("the good movie", max_new_tokens=5, do_sample=False, details=True)
    assert detailed.details is not None and detailed.details.generated_tokens == len(detailed.details.tokens)
    pieces = list(client.text_generation("the good movie", max_new_tokens=5, do_sample=False, stream=True))
    events = list(client.text_generation("the good movie", max_new_tokens=5, do_sample=False, stream=True,
                                         details=True))
    assert "".join(pieces) == text == detailed.generated_text  # greedy: the same text every way
    assert [e.token.text for e in events] == pieces and events[-1].generated_text == text
    assert events[-1].details is not None and events[-1].details.finish_reason in ("length", "eos_token")
    assert all(e.generated_text is None for e in events[:-1])


def test_inference_client_gets_tgis_typed_errors_plain_and_streamed(generator: Server) -> None:
    """text_generation posts to POST /: its errors carry TGI's error_type there too, so the
    client raises its typed error (a plain HfHubHTTPError without it)."""
    from huggingface_hub.errors import ValidationError

    client = _hf(generator)
    for stream in (False, True):
        with pytest.raises(ValidationError, match="max_new_tokens"):
            result = client.text_generation("the", max_new_tokens=10**6, stream=stream)
            list(result) if stream else None
    answer = generator.post_json({"inputs": "the", "parameters": {"max_new_tokens": 10**6}})
    assert answer.status == 400 and answer.json()["error_type"] == "validation"
    for path in ("/generate", "/"):  # the declared envelope, where the document gives it
        errors = generator.request("GET", "/openapi.json").json()["paths"][path]["post"]["responses"]["400"]
        assert errors["content"]["application/json"]["schema"]["$ref"].endswith("/TeiError"), path


def test_inference_client_chat_completion_plain_and_streamed(generator: Server) -> None:
    client = _hf(generator)
    messages = [{"role": "user", "content": "hello there"}]
    plain = client.chat_completion(messages, max_tokens=6, temperature=0)
    chunks = list(client.chat_completion(messages, max_tokens=6, temperature=0, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert plain.choices[0].message.content == streamed and plain.usage.completion_tokens >= 1
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_a_stop_sequence_split_over_tokens_is_never_half_streamed(generator: Server) -> None:
    """A stop sequence made of one token's last character and the next token's first: streamed,
    that first character was sent before the stop was complete, so the streamed text had it
    and the plain answer did not."""
    client = _openai(generator)
    parameters = {"max_new_tokens": 24, "ignore_eos": True, "do_sample": False, "details": True}
    tokens = [token["text"] for token in generator.request(
        "POST", "/generate", json.dumps({"inputs": "the good movie", "parameters": parameters}),
        {"Content-Type": "application/json"}).json()["details"]["tokens"]]
    text = "".join(tokens)
    boundaries = [len("".join(tokens[:i + 1])) for i in range(len(tokens) - 1) if tokens[i] and tokens[i + 1]]
    stop = next((text[at - 1:at + 1] for at in boundaries if text.find(text[at - 1:at + 1]) == at - 1), None)
    assert stop is not None, tokens  # a pair of characters first met across a boundary
    ask = {"model": "m", "prompt": "the good movie", "max_tokens": 24, "temperature": 0, "stop": [stop],
           "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**ask).choices[0].text
    assert plain == text[:text.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True) if c.choices)
    assert streamed == plain


def test_openai_completions_and_chat_plain_and_streamed(generator: Server) -> None:
    client = _openai(generator)
    # ignore_eos: exactly max_tokens tokens, whatever the tiny model's greedy choice is.
    completion = client.completions.create(model="m", prompt="the good movie", max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert len(completion.choices) == 1 and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4 and completion.choices[0].text  # words, not nothing
    pieces = [c.choices[0].text for c in client.completions.create(
        model="m", prompt="the good movie", max_tokens=4, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(pieces) == completion.choices[0].text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0, seed=3,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 5 and chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_completion_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == chat.usage.total_tokens
    sampled = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                              max_completion_tokens=8, temperature=1.5, seed=11,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample


def test_bad_parameters_are_a_4xx_before_any_event(generator: Server, start_server: Any,
                                                   task_models: dict[str, Path]) -> None:
    import openai

    client = _openai(generator)
    with pytest.raises(openai.BadRequestError, match='"n" must be an integer <= 1'):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        client.completions.create(model="m", prompt="x", max_tokens=10**6, stream=True)
    reply = generator.request("POST", "/generate_stream", json.dumps({"inputs": "x", "parameters": {"top_p": 5}}),
                              {"Content-Type": "application/json"})
    assert reply.status == 400 and reply.headers["content-type"].startswith("application/json")
    no_template = start_server("--model", str(task_models["text-generation"]))
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        _openai(no_template).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


@pytest.mark.timeout(120)
def test_a_chat_template_that_refuses_the_messages_is_a_400_and_the_worker_keeps_serving(
        task_models: dict[str, Path], start_server: Any, tmp_path: Path) -> None:
    """Templates refuse messages they do not take by raising (jinja2's TemplateError, through
    transformers' `raise_exception`): a 400 with the template's words, not a crashed worker."""
    import openai
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant ")
    server = start_server("--model", str(save_gpt2(tmp_path / "refusing-chat", tokenizer)))
    client = _openai(server)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="System role not supported"):
            client.chat.completions.create(model="m", max_completion_tokens=2, stream=stream,
                                           messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}])
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=2, extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    restarts = re.findall(r"^pipeserve_worker_restarts_total\{.*\} (\S+)$",
                          server.request("GET", "/metrics").body.decode(), re.MULTILINE)
    assert restarts and all(float(count) == 0 for count in restarts)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", ["lfm2-hybrid", "mamba"])
def test_recurrent_state_models_serve_streams_that_end_apart(family: str, task_models: dict[str, Path],
                                                             start_server: Any, tmp_path: Path) -> None:
    """LFM2 (convolution states beside attention) and Mamba (state-space layers only) are served
    in static batches. Two streams that wait behind a long one are prefilled as one batch; the
    shorter ends first, and its rows leave the recurrent states too. Every stream gives the
    model's own greedy tokens (recomputed without a cache)."""
    from transformers import AutoTokenizer

    from test_families import _alone, _model

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    model = _model(family, tokenizer)
    folder = tmp_path / family
    if family == "mamba":  # as a real Mamba's config: no position table (the tests' configs share one)
        delattr(model.config, "max_position_embeddings")
    model.save_pretrained(folder)
    tokenizer.model_max_length = int(1e30)  # saved without a limit: no JSON integer holds it
    tokenizer.save_pretrained(folder)
    server = start_server("--model", str(folder), "--dtype", "float32")
    # /info was a 500 with it; the engine's own bound instead.
    from pipeserve.model.model_limits import max_positions

    assert server.info()["details"]["max_input_length"] == max_positions(model.config, tokenizer) < 10**7
    prompts = {"first": "the good movie", "short": "a", "long": "hello world this is"}
    lengths = {"first": 100, "short": 2, "long": 8}
    later: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}

    async def streams() -> dict[str, list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            def join() -> None:  # while the first runs: both wait, then share one static batch
                for name in ("short", "long"):
                    later[name] = asyncio.ensure_future(_stream(
                        session, server.port, prompts[name], {"max_new_tokens": lengths[name], "ignore_eos": True}))

            first = await _stream(session, server.port, prompts["first"],
                                  {"max_new_tokens": lengths["first"], "ignore_eos": True}, at_event=(1, join))
            return {"first": first, **{name: await future for name, future in later.items()}}

    events = asyncio.run(streams())
    for name, prompt in prompts.items():
        tokens = [event["token"]["id"] for event in events[name]]
        assert len(tokens) == lengths[name], (name, events[name][-1])
        assert tokens == _alone(model, tokenizer, prompt, lengths[name]), (family, name)


def test_a_prompt_longer_than_max_batch_prefill_tokens_is_chunked_beside_a_running_stream(
        task_models: dict[str, Path], start_server: Any) -> None:
    """With --max-batch-prefill-tokens 8, a ~30-token prompt that arrives while another stream
    runs is prefilled 8 tokens a step (steps that send no token), the running stream decoding
    between: both give the model's own greedy tokens, and the worker is never restarted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_families import _alone

    folder = task_models["text-generation"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    server = start_server("--model", str(folder), "--dtype", "float32", "--max-batch-prefill-tokens", "8")
    prompts = {"running": "the cat", "long": " ".join(["the good movie was long"] * 5)}
    lengths = {"running": 40, "long": 6}
    assert len(tokenizer(prompts["long"])["input_ids"]) > 3 * 8
    later: list[asyncio.Future[list[dict[str, Any]]]] = []

    async def streams() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            def join() -> None:
                later.append(asyncio.ensure_future(_stream(
                    session, server.port, prompts["long"], {"max_new_tokens": lengths["long"], "ignore_eos": True})))

            running = await _stream(session, server.port, prompts["running"],
                                    {"max_new_tokens": lengths["running"], "ignore_eos": True}, at_event=(1, join))
            return running, await later[0]

    events = dict(zip(("running", "long"), asyncio.run(streams()), strict=True))
    for name, prompt in prompts.items():
        tokens = [event["token"]["id"] for event in events[name]]
        assert tokens == _alone(model, tokenizer, prompt, lengths[name]), (name, events[name][-1])
    restarts = re.findall(r"^pipeserve_worker_restarts_total\{.*\} (\S+)$",
                          server.request("GET", "/metrics").body.decode(), re.MULTILINE)
    assert restarts and all(float(count) == 0 for count in restarts)


async def _stream(session: aiohttp.ClientSession, port: int, prompt: str, parameters: dict[str, Any],
                  abandon_after: int | None = None, headers: dict[str, str] | None = None,
                  at_event: tuple[int, Callable[[], None]] | None = None) -> list[dict[str, Any]]:
    """The events of one /generate_stream; `at_event` (n, action) acts once the n-th arrived."""
    events = []
    async with session.post(f"http://127.0.0.1:{port}/generate_stream", headers=headers,
                            json={"inputs": prompt, "parameters": parameters}) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
                if at_event is not None and len(events) == at_event[0]:
                    at_event[1]()
                if abandon_after is not None and len(events) >= abandon_after:
                    return events  # closes the connection mid-stream
    return events


def _generate(server: Server) -> dict[str, Any]:
    """A plain TGI /generate of two greedy tokens, with its details; checks its shape and length."""
    reply = server.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {
        "max_new_tokens": 2, "ignore_eos": True, "details": True}}), {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    answer = reply.json()
    details = answer["details"]
    assert (details["finish_reason"], details["generated_tokens"], len(details["tokens"])) == ("length", 2, 2)
    assert answer["generated_text"] and answer["generated_text"] == "".join(t["text"] for t in details["tokens"])
    return answer


def _one_stream(port: int, parameters: dict[str, Any], at_event: tuple[int, Callable[[], None]]) -> list[dict[str, Any]]:
    async def scenario() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await _stream(session, port, "the", parameters, at_event=at_event)

    return asyncio.run(scenario())


def test_concurrent_streams_share_steps_and_an_abandoned_one_is_cancelled(generator: Server) -> None:
    before = generator.info()["counters"]["streams"]

    async def scenario() -> list[list[dict[str, Any]]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            # A long stream runs first; every short one's decoding steps must include it.
            running = asyncio.Event()
            long = asyncio.ensure_future(_stream(session, generator.port, "the cat",
                                                 {"max_new_tokens": 1000, "ignore_eos": True},
                                                 at_event=(1, running.set), abandon_after=None))
            await asyncio.wait_for(running.wait(), 60)
            streams = [_stream(session, generator.port, f"the {word} movie", LONG)
                       for word in ("good", "bad", "new", "old", "big", "small", "red", "blue")]
            short = list(await asyncio.gather(*streams))
            long.cancel()  # the client leaves mid-stream
            await asyncio.gather(long, return_exceptions=True)
            return [[], *short]

    results = asyncio.run(scenario())
    for events in results[1:]:
        assert len(events) == 12 and events[-1]["details"]["finish_reason"] == "length"
        assert [e["index"] for e in events] == list(range(1, 13))
    wait_until(lambda: generator.info()["counters"]["streams"]["open"] == 0, 30, message="streams closed")
    after = generator.info()["counters"]["streams"]
    assert after["cancelled"] == before["cancelled"] + 1
    # Each short stream's 11 decoding steps after its first token ran beside the long one.
    assert after["shared_steps"] - before["shared_steps"] >= 11
    assert after["steps"] - before["steps"] < 8 * 12  # not one forward pass per token
    metrics = generator.request("GET", "/metrics").body.decode()
    assert re.search(r'^pipeserve_streams_total\{finish_reason="cancelled",model="[^"]+"\} [1-9]', metrics, re.M)
    assert "pipeserve_time_to_first_token_seconds_count" in metrics


def test_a_deadline_ends_a_stream_with_an_error_event(generator: Server) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await _stream(session, generator.port, "the", {"max_new_tokens": 1000, "ignore_eos": True},
                                 headers={"X-Request-Timeout": "0.5"})

    events = asyncio.run(scenario())
    assert events[-1] == {"error": "request timed out while generating", "error_type": "incomplete_generation"}
    assert len(events) > 1  # tokens came before the deadline


def test_a_generation_is_bounded_by_generation_timeout_not_request_timeout(start_server: Any,
                                                                          chat_model: Path) -> None:
    server = start_server("--model", str(chat_model), "--request-timeout", "0.5")
    long = {"max_new_tokens": 1000, "ignore_eos": True, "details": True}

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            cut = await _stream(session, server.port, "the", long, headers={"X-Request-Timeout": "0.5"})
            whole = await _stream(session, server.port, "the", long)
            return cut, whole

    cut, whole = asyncio.run(scenario())
    assert cut[-1]["error"] == "request timed out while generating"  # so 1000 tokens take over 0.5 s here
    assert len(whole) == 1000 and whole[-1]["details"]["finish_reason"] == "length"


def test_a_worker_killed_mid_stream_ends_it_with_an_error_and_restarts(start_server: Any, chat_model: Path) -> None:
    server = start_server("--model", str(chat_model))
    pid = server.worker_pid()
    first = _generate(server)
    events = _one_stream(server.port, {"max_new_tokens": 1000, "ignore_eos": True},
                         at_event=(2, lambda: os.kill(pid, signal.SIGKILL)))
    assert "crashed" in events[-1]["error"] and events[-1]["error_type"] == "incomplete_generation"
    assert len(events) < 1000
    server.wait_ready(60)
    assert server.worker_pid() != pid
    again = _generate(server)  # the restarted worker generates, and greedily the same tokens
    assert [t["id"] for t in again["details"]["tokens"]] == [t["id"] for t in first["details"]["tokens"]]
    assert again["generated_text"] == first["generated_text"]


def test_a_stalled_generation_step_ends_its_stream_and_restarts_the_worker(start_server: Any,
                                                                            chat_model: Path) -> None:
    server = start_server("--model", str(chat_model), "--batch-timeout", "1")
    pid = server.worker_pid()
    first = _generate(server)
    # SIGSTOP: the process lives but never steps again, as a hung kernel would.
    events = _one_stream(server.port, {"max_new_tokens": 1000, "ignore_eos": True},
                         at_event=(2, lambda: os.kill(pid, signal.SIGSTOP)))
    assert "generation stalled" in events[-1]["error"] and events[-1]["error_type"] == "incomplete_generation"
    assert len(events) < 1000
    # The error event goes out before the kill: wait for the restart rather than for /ready.
    wait_until(lambda: server.info()["workers"][0]["pid"] not in (pid, None), 60, message="a new worker")
    server.wait_ready(60)
    assert "no generation step in 1s (--batch-timeout); killing it" in server.log
    again = _generate(server)  # the restarted worker generates, and greedily the same tokens
    assert [t["id"] for t in again["details"]["tokens"]] == [t["id"] for t in first["details"]["tokens"]]
    assert again["generated_text"] == first["generated_text"]


def test_sigterm_lets_running_streams_finish_then_exits_0(start_server: Any, chat_model: Path) -> None:
    server = start_server("--model", str(chat_model), "--drain-timeout", "60")
    events = _one_stream(server.port, {"max_new_tokens": 300, "ignore_eos": True},
                         at_event=(1, lambda: server.signal(signal.SIGTERM)))
    assert len(events) == 300 and events[-1]["details"]["finish_reason"] == "length"
    assert server.wait_exit(60) == 0
    assert "draining 0 queued and 0 running jobs and 1 streams" in server.log
    access = [line for line in server.lines if "POST /generate_stream 200" in line]
    assert access and "generated_tokens=300 finish=length" in access[0]


def test_a_reader_that_stops_reading_holds_up_only_its_own_stream(generator: Server) -> None:
    async def scenario() -> tuple[list[list[dict[str, Any]]], int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            response = await session.post(f"http://127.0.0.1:{generator.port}/generate_stream",
                                          json={"inputs": "the", "parameters": {"max_new_tokens": 500,
                                                                                "ignore_eos": True}})
            assert response.status == 200
            await response.content.readline()  # its first event, then no reading until the others are done
            others = await asyncio.gather(*(_stream(session, generator.port, f"the {w}", LONG)
                                            for w in ("good", "bad", "new")))
            rest = await response.read()  # everything it was sent meanwhile, waiting for it
            response.release()
            return list(others), rest.count(b"data:")

    others, slow_events = asyncio.run(scenario())
    assert all(len(events) == 12 for events in others)
    assert slow_events == 499  # not one token of the slow stream was lost
