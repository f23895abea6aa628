"""Admission control, deadlines, limits and access, against a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server, wait_until

ECHO = ("--pipeline", "custom_pipelines:make")


async def _timed_post(session: aiohttp.ClientSession, port: int, document: Any,
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any, float]:
    started = time.monotonic()
    async with session.post(f"http://127.0.0.1:{port}/", json=document, headers=headers) as response:
        body = await response.json()
        return response.status, dict(response.headers), body, time.monotonic() - started


def _in_flight(server: Server) -> bool:
    return server.info()["counters"]["in_flight"] > 0


def test_a_burst_beyond_the_queue_is_answered_503_in_milliseconds(start_server: Any) -> None:
    server = start_server(*ECHO, "--max-queue", "8", "--max-batch-size", "4",
                          env={"TEST_CALL_DELAY_S": "0.2"})

    async def burst() -> list[Any]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            return list(await asyncio.gather(*(_timed_post(session, server.port, {"inputs": f"b{i}"})
                                               for i in range(200))))

    results = asyncio.run(burst())
    statuses = [status for status, *_ in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 8 and statuses.count(503) >= 100
    refused = [latency for status, _, _, latency in results if status == 503]
    assert statistics.median(refused) < 0.5, "a refusal must not wait for the model"
    for status, headers, body, _ in results:
        if status == 503:
            assert 1 <= int(headers["Retry-After"]) <= 60 and "queue is full" in body["error"]
    assert server.info()["counters"]["refused"]["queue_full"] == statuses.count(503)
    assert server.post_json({"inputs": "after the burst"}).status == 200


def test_queue_wait_guard_refuses_while_the_oldest_job_waits_too_long(start_server: Any) -> None:
    server = start_server(*ECHO, "--max-queue-wait-ms", "300")

    async def scenario() -> tuple[Any, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            blocker = asyncio.ensure_future(_timed_post(session, server.port, {"inputs": "SLEEP:1.5"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="blocker running")
            waiting = asyncio.ensure_future(_timed_post(session, server.port, {"inputs": "waits"}))
            await asyncio.to_thread(wait_until, lambda: server.info()["counters"]["queue_depth"] == 1, 10)
            await asyncio.sleep(0.5)  # the queued job's age, which the guard measures
            refused = await _timed_post(session, server.port, {"inputs": "refused"})
            await blocker
            return refused, await waiting

    refused, waited = asyncio.run(scenario())
    assert refused[0] == 503 and "waiting too long" in refused[2]["error"]
    assert waited[0] == 200
    assert server.post_json({"inputs": "caught up"}).status == 200


def test_expired_jobs_get_504_and_are_never_computed(start_server: Any, tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    server = start_server(*ECHO, env={"TEST_SEEN_FILE": str(seen)})

    async def scenario() -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            blocker = asyncio.ensure_future(_timed_post(session, server.port, {"inputs": "SLEEP:1.5"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="blocker running")
            late = await _timed_post(session, server.port, {"inputs": "too-late"},
                                     {"X-Request-Timeout": "0.3"})
            await blocker
            return late

    status, _, body, latency = asyncio.run(scenario())
    assert status == 504 and body["error"] == "request timed out"
    assert 0.25 < latency < 1.2
    assert server.post_json({"inputs": "next"}).status == 200  # a batch forms after the drop
    assert "too-late" not in seen.read_text()
    assert server.info()["counters"]["dropped"]["expired"] == 1


def test_timeout_header_is_validated_and_capped(start_server: Any) -> None:
    server = start_server(*ECHO, "--request-timeout", "0.5")
    bad = server.post_json({"inputs": "x"}, headers={"X-Request-Timeout": "soon"})
    assert bad.status == 400 and "X-Request-Timeout" in bad.json()["error"]
    started = time.monotonic()
    capped = server.post_json({"inputs": "SLEEP:3"}, headers={"X-Request-Timeout": "100"})
    assert capped.status == 504 and time.monotonic() - started < 2


def test_disconnected_clients_jobs_are_dropped_before_compute(start_server: Any, tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    server = start_server(*ECHO, env={"TEST_SEEN_FILE": str(seen)})

    def send_and_abort(text: str) -> None:
        body = json.dumps({"inputs": text}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: server.info()["counters"]["queue_depth"] >= 1, 5, message="queued")

    async def scenario() -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            blocker = asyncio.ensure_future(_timed_post(session, server.port, {"inputs": "SLEEP:1.5"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="blocker running")
            for index in range(3):
                await asyncio.to_thread(send_and_abort, f"abandoned-{index}")
            return await blocker

    assert asyncio.run(scenario())[0] == 200
    wait_until(lambda: server.info()["counters"]["dropped"].get("disconnected", 0) == 3
               or server.info()["counters"]["queue_depth"] == 0, 5, message="dropped")
    assert server.post_json({"inputs": "next"}).status == 200
    assert "abandoned" not in seen.read_text()
    assert server.info()["counters"]["dropped"]["disconnected"] == 3


def test_body_and_item_limits_answer_413(start_server: Any) -> None:
    server = start_server(*ECHO, "--max-body-bytes", "1K", "--max-items", "3")
    big = server.request("POST", "/", "x" * 2048, {"Content-Type": "text/plain"})
    assert big.status == 413 and big.json() == {"error": "request body too large"}
    many = server.post_json({"inputs": ["a", "b", "c", "d"]})
    assert many.status == 413 and "at most 3" in many.json()["error"]
    assert server.post_json({"inputs": ["a", "b", "c"]}).status == 200


def test_text_longer_than_the_model_maximum_is_truncated(start_server: Any,
                                                        tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["text-classification"]))
    long_text = "the movie was very good " * 200  # ~1000 tokens; the model takes 128
    reply = server.post_json({"inputs": [long_text, "short"]})
    assert reply.status == 200, reply.body
    assert {item["label"] for item in reply.json()} <= {"POSITIVE", "NEGATIVE"}


def test_api_key_is_required_except_for_health_and_ready(start_server: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    server = start_server(*ECHO, "--api-key-file", str(key_file))
    assert server.request("GET", "/health").status == 200
    assert server.request("GET", "/ready").status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
        reply = server.post_json({"inputs": "x"}, headers=headers)
        assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json() == {"error": "missing or invalid API key"}
    assert server.request("GET", "/info").status == 401
    ok = server.post_json({"inputs": "x"}, headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status == 200


def test_api_key_from_the_environment(start_server: Any) -> None:
    server = start_server(*ECHO, env={"PIPESERVE_API_KEY": "from-env"})
    assert server.post_json({"inputs": "x"}).status == 401
    assert server.post_json({"inputs": "x"}, headers={"Authorization": "bearer from-env"}).status == 200


def test_non_loopback_bind_without_a_key_warns(start_server: Any) -> None:
    server = start_server(*ECHO, "--host", "0.0.0.0")
    assert "without --api-key" in server.log
    assert server.post_json({"inputs": "x"}).status == 200  # still reached over loopback


# --- fuzzing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_target() -> Any:
    server = Server([*ECHO, "--max-body-bytes", "64K"], {"TEST_PLAIN": "1"})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)
_documents = st.one_of(
    _json_values,
    st.fixed_dictionaries({"inputs": _json_values}),
    st.fixed_dictionaries({"inputs": st.one_of(st.text(max_size=50), st.lists(st.text(max_size=20), max_size=70))},
                          optional={"parameters": st.one_of(_json_values, st.dictionaries(
                              st.sampled_from(["suffix", "upper", "bogus", "batch_size"]), _json_values,
                              max_size=3))}),
)
_content_types = st.sampled_from(["application/json", "text/plain", "application/octet-stream",
                                  "application/x-www-form-urlencoded", "image/png", "", "application/ld+json"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_documents, raw=st.binary(max_size=300), use_raw=st.booleans(), content_type=_content_types)
def test_fuzzed_requests_get_well_formed_json_2xx_or_4xx(fuzz_target: Server, document: Any, raw: bytes,
                                                          use_raw: bool, content_type: str) -> None:
    body = raw if use_raw else json.dumps(document).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    reply = fuzz_target.request("POST", "/", body, headers)
    assert 200 <= reply.status < 500, (reply.status, reply.body)
    payload = reply.json()
    if reply.status >= 400:
        assert isinstance(payload.get("error"), str) and "Traceback" not in payload["error"]
    assert reply.headers.get("x-request-id")


def test_server_is_healthy_after_fuzzing(fuzz_target: Server) -> None:
    assert fuzz_target.request("GET", "/health").status == 200
    assert fuzz_target.post_json({"inputs": "still fine"}).json()["text"] == "still fine"
    assert fuzz_target.process.poll() is None
