"""The HTTP face in-process: aiohttp's test client against the real app and runtime, with a small
torch-free model process (tests/children.py) behind it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from children import GATE_ENV
from pipeserve.front.config import Config
from pipeserve.front.deployment import Deployment, ModelEntry
from pipeserve.front.models import MODELS, Models
from pipeserve.front.runtime import Runtime
from pipeserve.http import create_app

WAIT_S = 30.0
Start = Callable[..., Awaitable[tuple[TestClient[Any, Any], Runtime]]]


@pytest.fixture
async def start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Start]:
    """Start the app on a loopback port with a child entry point and settings; stop it after."""
    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gate"))
    started: list[tuple[TestClient[Any, Any], Runtime]] = []

    async def make(child: str = "echo", wait_ready: bool = True, **settings: Any) -> tuple[TestClient[Any, Any], Runtime]:
        config = Config(pipeline="unused:unused", **settings)
        models = Models(Deployment(config, (ModelEntry("m", config),)), entry_point=f"children:{child}")
        runtime = models.first
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(models)))
        await client.start_server()
        models.start()
        started.append((client, runtime))
        if wait_ready:
            await until(runtime, lambda: runtime.unavailable_reason() is None)
        return client, runtime

    yield make
    for client, runtime in started:
        await _bounded(runtime.stop(), "runtime.stop()")
        await _bounded(client.close(), "the test client's close()")


async def _bounded(step: Awaitable[None], name: str) -> None:
    """Await a teardown step; if it hangs, fail at once naming what every task is waiting on."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=WAIT_S)
    if task in done:
        task.result()
        return
    # Named while still suspended: once cancelled, the step's own chain is gone.
    stacks = [f"{each.get_name()}: {_awaiting(each.get_coro())}" for each in asyncio.all_tasks()]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    pytest.fail(f"{name} did not return in {WAIT_S:g}s; pending tasks:\n" + "\n".join(stacks))


def _awaiting(awaitable: Any) -> str:
    """The chain of coroutines a task is suspended in, down to the future it waits on."""
    chain = []
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            chain.append(repr(awaitable)[:200])
            break
        chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    return " -> ".join(chain)


async def until(runtime: Runtime, predicate: Callable[[], bool]) -> None:
    async def wait() -> None:
        while not predicate():
            runtime.changed.clear()
            await runtime.changed.wait()

    await asyncio.wait_for(wait(), WAIT_S)


async def test_json_inputs_are_answered_in_order(start: Start) -> None:
    client, _ = await start()
    response = await client.post("/", json={"inputs": ["a", "b"], "parameters": {"suffix": "!"}})
    assert response.status == 200 and await response.json() == ["a!", "b!"]
    single = await client.post("/", data="raw text", headers={"Content-Type": "text/plain"})
    assert await single.json() == "raw text"


@pytest.mark.parametrize(("document", "fragment"), [
    ({"inputs": "x", "parameters": {"bogus": 1}}, "unknown parameter 'bogus'; accepted: suffix"),
    ({"inputs": "x", "parameters": {"suffix": 3}}, "parameter 'suffix' must be a string"),
    ({"inputs": "x", "parameters": {"batch_size": 2}}, "'batch_size' is set by the server"),
    ({"inputs": 1}, '"inputs" must be a string or a list, not an integer'),
])
async def test_parameters_are_validated_from_the_schema_the_child_sent(
        start: Start, document: Any, fragment: str) -> None:
    client, _ = await start()
    response = await client.post("/", json=document)
    body = await response.json()
    assert response.status == 400 and fragment in body["error"], body
    assert response.headers["X-Request-Id"]


async def test_a_failed_input_of_a_list_names_its_index(start: Start) -> None:
    client, _ = await start()
    response = await client.post("/", json={"inputs": ["fine", "BAD"]})
    assert response.status == 400 and await response.json() == {"error": "bad input", "index": 1}


async def test_routing_errors_are_json(start: Start) -> None:
    client, _ = await start()
    missing = await client.get("/nope")
    assert missing.status == 404 and await missing.json() == {"error": "not found"}
    wrong = await client.get("/")
    assert wrong.status == 405 and "POST" in wrong.headers["Allow"]


async def test_while_loading_requests_get_503_before_their_body_is_parsed(start: Start, tmp_path: Path) -> None:
    client, runtime = await start("slow_load", wait_ready=False)
    ready = await client.get("/ready")
    assert ready.status == 503 and await ready.json() == {"status": "unavailable", "reason": "loading"}
    early = await client.post("/", data=b"{not json", headers={"Content-Type": "application/json"})
    assert early.status == 503 and int(early.headers["Retry-After"]) >= 1
    assert (await early.json())["error"] == "the model is loading"
    (tmp_path / "gate").touch()
    await until(runtime, lambda: runtime.unavailable_reason() is None)
    assert (await client.get("/ready")).status == 200


async def test_a_stop_while_the_workers_spawn_returns_and_leaves_none_running(start: Start) -> None:
    _, runtime = await start(wait_ready=False, workers=2)
    await asyncio.sleep(0)  # the supervisors' tasks begin: each is now spawning its process
    spawning = [s.worker for s in runtime.supervisors if s.worker is not None]
    assert spawning  # the stop below lands inside the spawn, where it used to wait forever
    await asyncio.wait_for(runtime.stop(), WAIT_S)
    assert all(worker.process is None or worker.process.exitcode is not None for worker in spawning)


async def test_info_reports_the_loaded_schema_and_every_public_setting(start: Start) -> None:
    client, _ = await start(max_batch_size=7, api_key="secret")
    info = await (await client.get("/info", headers={"Authorization": "Bearer secret"})).json()
    assert info["parameters"] == ["suffix"] and info["task"] == "echo"
    assert info["settings"]["max_batch_size"] == 7 and "api_key" not in info["settings"]
    assert set(info["settings"]) == {name for name in Config.__dataclass_fields__
                                     if name not in ("api_key", "api_key_file")}


async def test_drain_gives_up_at_its_timeout_while_a_batch_still_runs(
        start: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeserve")
    client, runtime = await start(drain_timeout=0.2)
    held = asyncio.ensure_future(client.post("/", json={"inputs": "GATE"}))
    await _poll(lambda: runtime.batcher.in_flight == 1)
    assert await runtime.drain() is False
    assert "drain incomplete: 0 queued, 1 running" in caplog.text
    (tmp_path / "gate").touch()
    response = await held
    assert response.status == 200  # the batch still finishes; the drain only stopped waiting


async def test_a_second_signal_cuts_the_drain_short(start: Start, tmp_path: Path) -> None:
    client, runtime = await start(drain_timeout=3600)
    held = asyncio.ensure_future(client.post("/", json={"inputs": "GATE"}))
    await _poll(lambda: runtime.batcher.in_flight == 1)
    models = client.app[MODELS]
    models.request_stop("SIGTERM")
    draining = asyncio.ensure_future(models.drain())
    await _poll(lambda: runtime.draining)
    refused = await client.post("/", json={"inputs": "late"})
    assert refused.status == 503 and (await refused.json())["error"] == "the server is shutting down"
    models.request_stop("SIGTERM")
    assert await asyncio.wait_for(draining, WAIT_S) is False
    (tmp_path / "gate").touch()
    await held


async def test_work_the_server_stops_under_is_answered_503_with_retry_after(start: Start) -> None:
    """A batch running and a request queued when the server stops: both are told to come back."""
    client, runtime = await start(workers=1, max_batch_size=1)
    held = asyncio.ensure_future(client.post("/", json={"inputs": "GATE"}))
    await _poll(lambda: runtime.batcher.in_flight == 1)
    queued = asyncio.ensure_future(client.post("/", json={"inputs": "queued"}))
    await _poll(lambda: runtime.batcher.depth == 1)
    await asyncio.wait_for(runtime.stop(), WAIT_S)
    for answer in (await held, await queued):
        assert answer.status == 503 and (await answer.json())["error"] == "the server is shutting down"
        assert answer.headers["Retry-After"] == "1"


async def _poll(predicate: Callable[[], bool]) -> None:
    """For what no event announces: check every 10 ms, fail after WAIT_S."""
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), WAIT_S)


async def test_the_api_key_guards_every_route_but_liveness_and_readiness(start: Start) -> None:
    from pipeserve.http import ROUTES

    client, _ = await start(api_key="the-key")
    for route in ROUTES:
        path = route.path.replace("{model:.+}", "some-model").replace("{name}", "page.js")
        headers = {"Accept": "text/html"} if route.media == "text/html" else {}  # the page: a browser's GET /
        response = await client.request(route.method, path, json={}, headers=headers)
        if route.public:
            assert response.status == 200, route.path
            response.release()
            continue
        body = await response.json()
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer", route.path
        message = body["error"]["message"] if route.dialect.name == "openai" else body["error"]
        assert message == "missing or invalid API key", (route.path, body)
    wrong = await client.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    async with client.post("/", json={"inputs": "x"}) as refused:  # GET / is public; POST / is not
        assert refused.status == 401
    async with client.get("/", headers={"Accept": "text/html"}) as page:  # the page, for a browser
        assert page.status == 200 and page.content_type == "text/html"


async def test_neither_the_key_nor_bodies_reach_the_log(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, _ = await start(api_key="sekrit-key-123")
    headers = {"Authorization": "Bearer sekrit-key-123"}
    for document in ({"inputs": "private words here"}, {"inputs": "private words here", "parameters": {"x": 1}},
                     {"inputs": "BAD private words here"}):
        await client.post("/", json=document, headers=headers)
    await client.post("/", data=b"{private words here", headers={**headers, "Content-Type": "application/json"})
    await client.post("/", json={"inputs": "x"}, headers={"Authorization": "Bearer wrong-sekrit"})
    assert caplog.records, "the requests were logged"
    assert "sekrit" not in caplog.text and "private words" not in caplog.text


async def test_deeply_nested_json_is_a_400_on_every_json_route(start: Start) -> None:
    from pipeserve.http import ROUTES

    client, _ = await start()
    nested = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    for route in ROUTES:
        if route.request is None:
            continue
        response = await client.post(route.path, data=nested, headers={"Content-Type": "application/json"})
        assert response.status == 400, route.path
