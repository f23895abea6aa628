"""Fault isolation: the front outlives every failure of the model process (real signals)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Server,
    client_session,
    counters,
    eventually,
    held_batch,
    post,
    queue_behind_held_batch,
    restart_load_gate,
    wait_until,
)

ECHO = ("--pipeline", "custom_pipelines:make")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_killed_worker_answers_every_request_at_once_and_restarts(start_server: Any, tmp_path: Path,
                                                                  sig: int) -> None:
    server = start_server(*ECHO)
    old_worker = server.worker_pid()

    async def scenario() -> list[Any]:
        async with client_session() as session, held_batch(session, server, tmp_path / "gate") as held:
            queued = [asyncio.ensure_future(post(session, server, {"inputs": f"q{i}"})) for i in range(5)]
            await eventually(lambda: counters(server)["queue_depth"] == 5, message="5 jobs queued")
            os.kill(old_worker, sig)
            # Answered while the gate is still closed, and long before any timeout (the
            # request timeout answers 504): only noticing the death can answer them.
            return list(await asyncio.gather(held.tasks[0], *queued))

    answers = asyncio.run(scenario())
    for answer in answers:
        assert answer.status == 503, answer
        assert int(answer.headers["retry-after"]) >= 1
        assert "error" in answer.body and "Traceback" not in answer.body["error"]
    assert "crashed" in answers[0].body["error"]  # the running batch
    assert all("restarting" in answer.body["error"] for answer in answers[1:])  # the queued jobs
    name = signal.Signals(sig).name
    death = server.wait_log(f"died: killed by {name}")
    if sig == signal.SIGKILL:
        assert "out of memory?" in death
    server.wait_ready(60)
    assert server.process.poll() is None
    new_worker = server.worker_pid()
    assert new_worker != old_worker
    assert server.info()["workers"][0]["restarts"] == 1
    assert server.post_json({"inputs": "after"}).json()["text"] == "after"


def test_ready_reports_restarting_while_the_worker_comes_back(start_server: Any, tmp_path: Path) -> None:
    env, armed, gate = restart_load_gate(tmp_path)
    server = start_server(*ECHO, env=env)
    old_worker = server.worker_pid()
    armed.touch()  # the restarted worker's load now waits for the gate
    os.kill(old_worker, signal.SIGKILL)
    try:
        reply = wait_until(lambda: (r := server.request("GET", "/ready")).status == 503 and r, 10,
                           message="/ready 503")
        assert reply.json() == {"status": "unavailable", "reason": "restarting"}
        refused = server.post_json({"inputs": "while restarting"})
        assert refused.status == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"] == "the model process is restarting"
        # Still held in its load: the state has not moved on by itself.
        assert server.info()["workers"][0]["state"] == "restarting"
        assert server.request("GET", "/ready").status == 503
    finally:
        gate.touch()
    server.wait_ready(60)
    worker = server.info()["workers"][0]
    assert worker["state"] == "ready" and worker["restarts"] == 1 and worker["pid"] != old_worker
    assert server.post_json({"inputs": "back"}).status == 200


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
    # A hub id cannot be fetched here: offline, as on this machine and CI.
    server = start_server(*args, ready=False, env={"HF_HUB_OFFLINE": "1"})
    assert server.wait_exit(60) == 3
    assert "restart #" not in server.log  # fast: a load failure gives up at once, no retries
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


def test_poison_input_is_isolated_by_bisection(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO)
    # Equal lengths, so that the length-aware batcher puts all 16 in one batch.
    texts = [f"item {i:02d}" for i in range(16)]
    texts[11] = "POISON!"
    before = counters(server)
    held, answers = asyncio.run(queue_behind_held_batch(server, tmp_path / "gate",
                                                         [{"inputs": t} for t in texts]))
    assert held.status == 200
    outcomes = list(zip(texts, answers, strict=True))
    good = [(t, a) for t, a in outcomes if a.status == 200]
    bad = [(t, a) for t, a in outcomes if a.status != 200]
    assert len(good) == 15 and all(a.body["text"] == t for t, a in good)
    assert len(bad) == 1 and bad[0][0] == "POISON!"
    assert bad[0][1].status == 400 and "poison input" in bad[0][1].body["error"]
    after = counters(server)
    assert after["batches"] - before["batches"] == 2  # the held one, then the 16 together
    # The 16 were bisected: more pipeline calls than batches.
    assert after["pipeline_calls"] - before["pipeline_calls"] > after["batches"] - before["batches"]


def test_internal_errors_do_not_leak_paths_but_are_logged_with_the_request_id(start_server: Any) -> None:
    server = start_server(*ECHO)
    reply = server.post_json({"inputs": "RAISE"}, headers={"X-Request-Id": "req-raise-1"})
    assert reply.status == 500
    assert reply.json() == {"error": "inference failed"}
    assert reply.headers["x-request-id"] == "req-raise-1"
    server.wait_log("request req-raise-1: pipeline failed")
    server.wait_log("/home/secret/models/weights.bin")
    assert server.post_json({"inputs": "still serving"}).status == 200


def test_out_of_memory_halves_the_batch_and_caps_later_batches(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO, env={"TEST_OOM_ABOVE": "4"})
    documents = [{"inputs": f"m{i}"} for i in range(16)]
    _, first = asyncio.run(queue_behind_held_batch(server, tmp_path / "gate-1", documents))
    assert all(answer.status == 200 for answer in first)
    assert max(answer.body["batch_size"] for answer in first) <= 4
    # Each half ran with the failed attempts' frames (what they allocated) freed: the retries ran
    # inside the handler of the failure, whose traceback kept them, so torch.cuda.empty_cache()
    # could free nothing and every level of halving added to what was held.
    assert {answer.body["held"] for answer in first} == {0}
    server.wait_log("out of memory at batch size 16")  # all 16 were tried together first
    calls_before = counters(server)["pipeline_calls"]
    _, second = asyncio.run(queue_behind_held_batch(server, tmp_path / "gate-2", documents))
    assert all(answer.status == 200 for answer in second)
    assert {answer.body["batch_size"] for answer in second} == {4}
    # Capped to 4 from the start: 16 items + the held one in 5 calls, no failed attempts.
    assert counters(server)["pipeline_calls"] - calls_before == 5


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


def test_a_device_error_restarts_the_worker_instead_of_failing_every_later_call(start_server: Any) -> None:
    """After a device-side assert every CUDA call of that process fails: the worker served 500s
    forever with /ready at 200. It exits (its batch is answered as a crash) and is restarted."""
    server = start_server(*ECHO, "--workers", "1")
    pid = server.worker_pid()
    broken = server.post_json({"inputs": ["fine", "CUDA_ASSERT"]})
    assert broken.status == 503 and "crashed" in broken.json()["error"] and "Retry-After" in {
        name.title() for name in broken.headers}
    server.wait_log("exited after a device error that breaks its CUDA context")
    wait_until(lambda: server.request("GET", "/ready").status == 200, timeout=60)
    assert server.worker_pid() != pid
    assert server.post_json({"inputs": "fine"}).json()["text"] == "fine"


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
    server.wait_log("exceeded --max-worker-memory")
    server.wait_ready(60)
    assert server.worker_pid() != old
    server.wait_log("restart #1 in 0.0s")


def test_jobs_queued_behind_a_batch_past_max_worker_memory_wait_for_the_restart(start_server: Any,
                                                                                tmp_path: Path) -> None:
    """Past the limit the front sends the worker no further batch and retires it once its batch
    is answered: the jobs queued behind are served by the restarted worker, none lost to the exit
    or failed as if it had crashed."""
    server = start_server(*ECHO, "--max-worker-memory", "700M", "--max-batch-size", "1")
    old = server.worker_pid()

    async def scenario() -> tuple[Any, Any, list[Any]]:
        async with client_session() as session:
            async with held_batch(session, server, tmp_path / "gate") as held:
                over = asyncio.ensure_future(post(session, server, {"inputs": "ALLOC:800"}))
                await eventually(lambda: counters(server)["queue_depth"] == 1, message="the allocation queued")
                after = [asyncio.ensure_future(post(session, server, {"inputs": f"after{i}"})) for i in range(3)]
                await eventually(lambda: counters(server)["queue_depth"] == 4, message="4 jobs queued")
            return held.answer, await over, list(await asyncio.gather(*after))

    held, over, after = asyncio.run(scenario())
    assert held.status == 200 and over.status == 200, (held, over)
    assert over.body["pid"] == old
    for answer in after:
        assert answer.status == 200, answer
        assert answer.body["pid"] != old  # the restarted worker's
    server.wait_log("retired by the front past --max-worker-memory")
    server.wait_log("restart #1 in 0.0s")
    assert server.info()["workers"][0]["restarts"] == 1


def test_a_model_already_past_max_worker_memory_when_loaded_does_not_start(start_server: Any) -> None:
    """Each restart would load it again and pass the limit again: it is refused with one line."""
    server = start_server(*ECHO, "--max-worker-memory", "1M", ready=False)
    assert server.wait_exit(60) == 3
    assert "over --max-worker-memory 1 MiB; raise the limit" in server.log


def test_hung_batch_is_killed_at_its_deadline_with_504(start_server: Any) -> None:
    server = start_server(*ECHO, "--batch-timeout", "1")
    old_worker = server.worker_pid()
    # HANG never returns, and the request timeout (30 s) would say "request timed out": this
    # answer can only come from the batch deadline.
    reply = server.post_json({"inputs": "HANG"})
    assert reply.status == 504
    assert "batch timeout" in reply.json()["error"]
    server.wait_log("ran past --batch-timeout 1s; killed it")
    server.wait_ready(60)
    worker = server.info()["workers"][0]
    assert worker["pid"] != old_worker and worker["restarts"] == 1
    assert server.post_json({"inputs": "alive"}).status == 200


def _draining(server: Server) -> Any:
    reply = server.request("GET", "/ready")
    return reply.status == 503 and reply


def test_sigterm_drains_in_flight_and_queued_jobs_then_exits_0(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()

    async def scenario() -> tuple[list[Any], Any, Any, int | None]:
        async with client_session() as session:
            async with held_batch(session, server, tmp_path / "gate") as held:
                queued = [asyncio.ensure_future(post(session, server, {"inputs": f"q{i}"})) for i in range(3)]
                await eventually(lambda: counters(server)["queue_depth"] == 3, message="queued")
                server.signal(signal.SIGTERM)
                ready = await eventually(lambda: _draining(server), message="/ready 503")
                late = await post(session, server, {"inputs": "late"})
                exited = server.process.poll()  # still draining: the held batch is not done
            return [held.answer, *await asyncio.gather(*queued)], ready, late, exited

    answers, ready, late, exited_while_held = asyncio.run(scenario())
    assert ready.json()["reason"] == "draining"
    assert late.status == 503
    assert exited_while_held is None
    assert [answer.status for answer in answers] == [200, 200, 200, 200]
    assert server.wait_exit(30) == 0
    wait_until(lambda: not _pid_alive(worker), 10, message="worker gone")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_still_drains(start_server: Any, tmp_path: Path, sig: int) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()

    async def scenario() -> tuple[Any, Any]:
        async with client_session() as session:
            async with held_batch(session, server, tmp_path / "gate") as held:
                # What a terminal's Ctrl-C, or systemd's KillMode=control-group, does.
                os.killpg(server.process.pid, sig)
                ready = await eventually(lambda: _draining(server), message="/ready 503")
            return held.answer, ready

    answer, ready = asyncio.run(scenario())
    assert ready.json()["reason"] == "draining"
    assert answer.status == 200  # the worker ignored the signal and finished the batch
    assert server.wait_exit(30) == 0
    assert "died" not in server.log
    wait_until(lambda: not _pid_alive(worker), 10, message="worker gone")


def test_worker_exits_when_the_front_is_killed(start_server: Any) -> None:
    server = start_server(*ECHO)
    worker = server.worker_pid()
    server.signal(signal.SIGKILL)
    server.wait_exit(10)
    wait_until(lambda: not _pid_alive(worker), 5, message="orphaned worker to exit")
