"""Admission control, deadlines, limits and access, against a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Server, client_session, completed, counters, eventually, held_batch, post, wait_until

ECHO = ("--pipeline", "custom_pipelines:make")


def test_a_burst_beyond_the_queue_is_refused_503_without_waiting_for_the_model(
        start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO, "--max-queue", "8", "--max-batch-size", "4")
    burst_size, max_queue = 200, 8

    async def scenario() -> tuple[list[Any], list[Any], Any]:
        async with client_session() as session:
            async with held_batch(session, server, tmp_path / "gate") as held:
                tasks = [asyncio.ensure_future(post(session, server, {"inputs": f"b{i}"}))
                         for i in range(burst_size)]
                # Every refusal arrives while the model is still held: none waited for it.
                refused = [task.result() for task in await completed(tasks, burst_size - max_queue)]
                depth = await asyncio.to_thread(lambda: counters(server)["queue_depth"])
                still_waiting = sum(not task.done() for task in tasks)
            return refused, list(await asyncio.gather(*tasks)), (held.answer, depth, still_waiting)

    refused, answers, (held, depth, still_waiting) = asyncio.run(scenario())
    assert held.status == 200
    assert depth == max_queue and still_waiting == max_queue
    assert len(refused) == burst_size - max_queue
    for answer in refused:
        assert answer.status == 503, answer
        assert 1 <= int(answer.headers["retry-after"]) <= 60 and "queue is full" in answer.body["error"]
    statuses = [answer.status for answer in answers]
    assert statuses.count(200) == max_queue and statuses.count(503) == burst_size - max_queue
    assert counters(server)["refused"]["queue_full"] == burst_size - max_queue
    assert server.post_json({"inputs": "after the burst"}).status == 200


def test_queue_wait_guard_refuses_while_the_oldest_job_waits_too_long(start_server: Any, tmp_path: Path) -> None:
    # A guard of one microsecond: by the time /info has shown the queued job, it has waited
    # longer than that for sure, so the next request must be refused (no sleep to age it).
    server = start_server(*ECHO, "--max-queue-wait-ms", "0.001")

    async def scenario() -> tuple[Any, Any]:
        async with client_session() as session:
            async with held_batch(session, server, tmp_path / "gate"):
                # Admitted: nothing was queued yet (the held batch is in flight, not queued).
                waiting = asyncio.ensure_future(post(session, server, {"inputs": "waits"}))
                await eventually(lambda: counters(server)["queue_depth"] == 1, message="one job queued")
                refused = await post(session, server, {"inputs": "refused"})
            return refused, await waiting

    refused, waited = asyncio.run(scenario())
    assert refused.status == 503 and "waiting too long" in refused.body["error"]
    assert int(refused.headers["retry-after"]) >= 1
    assert waited.status == 200
    assert counters(server)["refused"]["queue_wait"] == 1
    assert server.post_json({"inputs": "caught up"}).status == 200


def test_expired_jobs_get_504_and_are_never_computed(start_server: Any, tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    server = start_server(*ECHO, env={"TEST_SEEN_FILE": str(seen)})

    async def scenario() -> Any:
        async with client_session() as session, held_batch(session, server, tmp_path / "gate"):
            # Answered while the model is held: at its own deadline, not when a batch ends.
            return await post(session, server, {"inputs": "too-late"}, {"X-Request-Timeout": "0.3"})

    late = asyncio.run(scenario())
    assert late.status == 504 and late.body["error"] == "request timed out"
    assert server.post_json({"inputs": "next"}).status == 200  # a batch forms after the drop
    assert "too-late" not in seen.read_text()
    # Queued, then dropped when its deadline passed: not refused at the door.
    assert counters(server)["dropped"]["expired"] == 1
    assert counters(server)["refused"].get("deadline", 0) == 0


def test_timeout_header_is_validated_and_capped(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO, "--request-timeout", "0.5")
    bad = server.post_json({"inputs": "x"}, headers={"X-Request-Timeout": "soon"})
    assert bad.status == 400 and "X-Request-Timeout" in bad.json()["error"]
    gate = tmp_path / "gate"
    try:
        # Held until after the answer: only the server's 0.5 s cap can end it (the client would
        # give up after 60 s, and the header asked for 100 s).
        capped = server.post_json({"inputs": f"WAIT:{gate}"}, headers={"X-Request-Timeout": "100"})
    finally:
        gate.touch()
    assert capped.status == 504 and capped.json()["error"] == "request timed out"


def _closed_by_the_server(client_port: int, server_port: int) -> bool:
    """Whether the server has closed its end of our (already closed) connection: the client's
    socket reaches TIME_WAIT only once the server's FIN arrived, i.e. after the server saw the
    disconnect (aiohttp cancels the request's handler right there)."""
    time_wait = "06"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (int(local.rsplit(":", 1)[1], 16) == client_port
                and int(remote.rsplit(":", 1)[1], 16) == server_port):
            return state == time_wait
    return False


def test_disconnected_clients_jobs_are_dropped_before_compute(start_server: Any, tmp_path: Path) -> None:
    seen = tmp_path / "seen.txt"
    server = start_server(*ECHO, env={"TEST_SEEN_FILE": str(seen)})

    def admitted() -> int:  # queued, or already dropped from the queue's head by a later submit
        now = counters(server)
        return now["queue_depth"] + now["dropped"].get("disconnected", 0)

    def send_and_abort(text: str, count: int) -> None:
        body = json.dumps({"inputs": text}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: admitted() == count, 10, message=f"{text} queued")
            client_port = sock.getsockname()[1]
        wait_until(lambda: _closed_by_the_server(client_port, server.port), 10,
                   message=f"the server to notice that {text}'s client went away")

    async def scenario() -> Any:
        async with client_session() as session:
            async with held_batch(session, server, tmp_path / "gate") as held:
                for index in range(3):
                    await asyncio.to_thread(send_and_abort, f"abandoned-{index}", index + 1)
            return held.answer

    assert asyncio.run(scenario()).status == 200
    assert server.post_json({"inputs": "next"}).status == 200  # formed after the dead jobs went
    assert "abandoned" not in seen.read_text()
    assert counters(server)["dropped"]["disconnected"] == 3
    assert counters(server)["queue_depth"] == 0


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
    answers = reply.json()  # per input, a list of {label, score}
    assert len(answers) == 2 and all(len(answer) == 1 for answer in answers), answers
    assert {item["label"] for answer in answers for item in answer} <= {"POSITIVE", "NEGATIVE"}


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
