"""Fault isolation: the front outlives every failure of the model process (real signals)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import Server, wait_until

ECHO = ("--pipeline", "custom_pipelines:make")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


async def _post(session: aiohttp.ClientSession, port: int, document: Any) -> tuple[int, dict[str, str], Any, float]:
    async with session.post(f"http://127.0.0.1:{port}/", json=document) as response:
        body = await response.json()
        return response.status, dict(response.headers), body, time.monotonic()


def _in_flight(server: Server) -> bool:
    return server.info()["counters"]["in_flight"] > 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_killed_worker_answers_every_request_fast_and_restarts(start_server: Any, sig: int) -> None:
    server = start_server(*ECHO)
    old_worker = server.worker_pid()

    async def scenario() -> tuple[list[Any], float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            running = asyncio.ensure_future(_post(session, server.port, {"inputs": "SLEEP:20"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="batch running")
            queued = [asyncio.ensure_future(_post(session, server.port, {"inputs": f"q{i}"}))
                      for i in range(5)]
            await asyncio.to_thread(wait_until, lambda: server.info()["counters"]["queue_depth"] == 5,
                                    10, message="5 jobs queued")
            killed_at = time.monotonic()
            os.kill(old_worker, sig)
            return list(await asyncio.gather(running, *queued)), killed_at

    results, killed_at = asyncio.run(scenario())
    for status, headers, body, answered_at in results:
        assert status == 503, body
        assert int(headers["Retry-After"]) >= 1
        assert "error" in body and "Traceback" not in body["error"]
        assert answered_at - killed_at < 2.0, "answered by noticing the death, not by a timeout"
    name = signal.Signals(sig).name
    wait_until(lambda: f"died: killed by {name}" in server.log, 5, message="death logged")
    if sig == signal.SIGKILL:
        assert "out of memory?" in server.log
    server.wait_ready(60)
    assert server.process.poll() is None
    new_worker = server.worker_pid()
    assert new_worker != old_worker
    assert server.info()["workers"][0]["restarts"] == 1
    assert server.post_json({"inputs": "after"}).json()["text"] == "after"


def test_ready_reports_restarting_while_the_worker_comes_back(start_server: Any) -> None:
    server = start_server(*ECHO, env={"TEST_LOAD_DELAY_S": "0"})
    os.kill(server.worker_pid(), signal.SIGKILL)
    reply = wait_until(lambda: (r := server.request("GET", "/ready")).status == 503 and r, 5,
                       message="/ready 503")
    assert reply.json() == {"status": "unavailable", "reason": "restarting"}
    refused = server.post_json({"inputs": "while restarting"})
    assert refused.status == 503 and "retry-after" in refused.headers
    server.wait_ready(60)


def test_crash_in_the_middle_of_a_batch_is_not_retried(start_server: Any) -> None:
    server = start_server(*ECHO)
    reply = server.post_json({"inputs": "SEGV"})
    assert reply.status == 503
    assert "crashed" in reply.json()["error"]
    server.wait_ready(60)
    assert server.post_json({"inputs": "fine"}).status == 200


def test_crash_loop_gives_up_and_exits_non_zero(start_server: Any) -> None:
    server = start_server(*ECHO, "--max-restarts", "2", "--restart-window", "120")
    for attempt in range(3):
        assert server.post_json({"inputs": "EXIT"}).status == 503
        if attempt < 2:
            server.wait_ready(60)
    assert server.wait_exit(30) == 1
    assert "giving up" in server.log
    assert "exited with code 7" in server.log


@pytest.mark.parametrize(("args", "fragment"), [
    (("--pipeline", "custom_pipelines:fail_to_load"), "weights at <path> are corrupt"),
    (("--model", "/nonexistent/model/dir"), "/nonexistent/model/dir"),
    (("--model", "tiny", "--task", "no-such-task"), "no-such-task"),
    (("--model", "no-such-org/no-such-model", "--task", "fill-mask"), "no-such-org/no-such-model"),
])
def test_a_model_that_cannot_load_exits_fast_with_one_line(
        start_server: Any, tiny_models: dict[str, Path], args: tuple[str, ...], fragment: str) -> None:
    args = tuple(str(tiny_models["fill-mask"]) if a == "tiny" else a for a in args)
    started = time.monotonic()
    # A hub id cannot be fetched here: offline, as on this machine and CI.
    server = start_server(*args, ready=False, env={"HF_HUB_OFFLINE": "1"})
    assert server.wait_exit(60) == 3
    assert time.monotonic() - started < 30
    errors = [line for line in server.lines if " ERROR " in f" {line} "]
    assert len(errors) == 1, server.log
    assert "cannot load model" in errors[0] and fragment in errors[0]
    assert "Traceback" not in server.log


def test_a_restart_that_cannot_load_the_model_exits(start_server: Any, tmp_path: Path) -> None:
    marker = tmp_path / "models-gone"
    server = start_server(*ECHO, env={"TEST_FAIL_LOAD_IF_EXISTS": str(marker)})
    marker.touch()
    os.kill(server.worker_pid(), signal.SIGKILL)
    assert server.wait_exit(60) == 3
    assert "the model files went away" in server.log and "restart #1" in server.log


def test_load_failure_detail_is_logged_at_debug_level(start_server: Any) -> None:
    server = start_server("--pipeline", "custom_pipelines:fail_to_load", "--log-level", "debug",
                          ready=False)
    assert server.wait_exit(60) == 3
    assert "Traceback" in server.log


def test_poison_input_is_isolated_by_bisection(start_server: Any) -> None:
    server = start_server(*ECHO)

    async def scenario() -> list[Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            blocker = asyncio.ensure_future(_post(session, server.port, {"inputs": "SLEEP:1"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="blocker running")
            # Equal lengths, so that the length-aware batcher puts all 16 in one batch.
            texts = [f"item {i:02d}" for i in range(16)]
            texts[11] = "POISON!"
            results = await asyncio.gather(*(_post(session, server.port, {"inputs": t}) for t in texts))
            await blocker
            return list(zip(texts, results))

    outcomes = asyncio.run(scenario())
    good = [(t, r) for t, r in outcomes if r[0] == 200]
    bad = [(t, r) for t, r in outcomes if r[0] != 200]
    assert len(good) == 15 and all(r[2]["text"] == t for t, r in good)
    assert len(bad) == 1 and bad[0][0] == "POISON!"
    assert bad[0][1][0] == 400 and "poison input" in bad[0][1][2]["error"]
    counters = server.info()["counters"]
    assert counters["batches"] == 2  # the blocker, then the 16 together
    assert counters["pipeline_calls"] > counters["batches"]  # the 16 were bisected


def test_internal_errors_do_not_leak_paths_but_are_logged_with_the_request_id(start_server: Any) -> None:
    server = start_server(*ECHO)
    reply = server.post_json({"inputs": "RAISE"}, headers={"X-Request-Id": "req-raise-1"})
    assert reply.status == 500
    assert reply.json() == {"error": "inference failed"}
    assert reply.headers["x-request-id"] == "req-raise-1"
    wait_until(lambda: "request req-raise-1: pipeline failed" in server.log, 5, message="error logged")
    assert "/home/secret/models/weights.bin" in server.log
    assert server.post_json({"inputs": "still serving"}).status == 200


def test_out_of_memory_halves_the_batch_and_caps_later_batches(start_server: Any) -> None:
    server = start_server(*ECHO, env={"TEST_OOM_ABOVE": "4"})

    async def burst() -> list[Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            blocker = asyncio.ensure_future(_post(session, server.port, {"inputs": "SLEEP:1"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="blocker running")
            results = await asyncio.gather(*(_post(session, server.port, {"inputs": f"m{i}"})
                                             for i in range(16)))
            await blocker
            return list(results)

    first = asyncio.run(burst())
    assert all(status == 200 for status, *_ in first)
    assert max(body["batch_size"] for _, _, body, _ in first) <= 4
    assert "out of memory at batch size" in server.log
    calls_before = server.info()["counters"]["pipeline_calls"]
    second = asyncio.run(burst())
    assert all(status == 200 for status, *_ in second)
    # Capped to 4 from the start: 16 items + the blocker in 5 calls, no failed attempts.
    assert server.info()["counters"]["pipeline_calls"] - calls_before == 5


def test_a_single_input_that_never_fits_gets_413_and_the_worker_keeps_serving(
        start_server: Any) -> None:
    server = start_server(*ECHO)
    pid = server.worker_pid()
    alone = server.post_json({"inputs": "OOM"})
    assert alone.status == 413 and "memory" in alone.json()["error"]
    in_list = server.post_json({"inputs": ["fine", "OOM", "also fine"]})
    assert in_list.status == 413 and in_list.json()["index"] == 1
    assert server.post_json({"inputs": "next"}).status == 200
    assert server.worker_pid() == pid


def _niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_the_worker_is_the_oom_killers_first_choice_and_yields_cpu(start_server: Any) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()
    assert Path(f"/proc/{worker}/oom_score_adj").read_text().strip() == "1000"
    assert Path(f"/proc/{server.process.pid}/oom_score_adj").read_text().strip() == "0"
    assert _niceness(worker) == _niceness(server.process.pid) + 5


def test_worker_over_its_memory_limit_is_restarted_cleanly(start_server: Any) -> None:
    server = start_server(*ECHO, "--max-worker-memory", "700M")
    old = server.worker_pid()
    reply = server.post_json({"inputs": "ALLOC:800"})
    assert reply.status == 200 and reply.json()["text"] == "ALLOC:800"  # answered, then recycled
    wait_until(lambda: "exceeded --max-worker-memory" in server.log, 10, message="recycle logged")
    server.wait_ready(60)
    assert server.worker_pid() != old
    assert "restart #1 in 0.0s" in server.log


def test_hung_batch_is_killed_at_its_deadline_with_504(start_server: Any) -> None:
    server = start_server(*ECHO, "--batch-timeout", "1")
    started = time.monotonic()
    reply = server.post_json({"inputs": "HANG"})
    assert reply.status == 504
    assert "batch timeout" in reply.json()["error"]
    assert time.monotonic() - started < 5
    server.wait_ready(60)
    assert server.post_json({"inputs": "alive"}).status == 200


def test_sigterm_drains_in_flight_and_queued_jobs_then_exits_0(start_server: Any) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()

    async def scenario() -> tuple[list[Any], Any, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            running = asyncio.ensure_future(_post(session, server.port, {"inputs": "SLEEP:1.5"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="batch running")
            queued = [asyncio.ensure_future(_post(session, server.port, {"inputs": f"q{i}"}))
                      for i in range(3)]
            await asyncio.to_thread(wait_until, lambda: server.info()["counters"]["queue_depth"] == 3,
                                    10, message="queued")
            server.signal(signal.SIGTERM)
            ready = await asyncio.to_thread(
                wait_until, lambda: (r := server.request("GET", "/ready")).status == 503 and r, 5)
            late = await _post(session, server.port, {"inputs": "late"})
            return list(await asyncio.gather(running, *queued)), ready, late

    results, ready, late = asyncio.run(scenario())
    assert ready.json()["reason"] == "draining"
    assert late[0] == 503
    assert [status for status, *_ in results] == [200, 200, 200, 200]
    assert server.wait_exit(30) == 0
    wait_until(lambda: not _pid_alive(worker), 5, message="worker gone")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_still_drains(start_server: Any, sig: int) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()

    async def scenario() -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            running = asyncio.ensure_future(_post(session, server.port, {"inputs": "SLEEP:1"}))
            await asyncio.to_thread(wait_until, lambda: _in_flight(server), 10, message="batch running")
            # What a terminal's Ctrl-C, or systemd's KillMode=control-group, does.
            os.killpg(server.process.pid, sig)
            return await running

    status, *_ = asyncio.run(scenario())
    assert status == 200
    assert server.wait_exit(30) == 0
    assert "died" not in server.log
    wait_until(lambda: not _pid_alive(worker), 5, message="worker gone")


def test_worker_exits_when_the_front_is_killed(start_server: Any) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()
    server.signal(signal.SIGKILL)
    server.wait_exit(10)
    wait_until(lambda: not _pid_alive(worker), 5, message="orphaned worker to exit")
