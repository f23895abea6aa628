"""Several model processes behind one front: parallel batches, independent supervision."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from conftest import Server, client_session, completed, counters, held_batch, post, restart_load_gate, wait_until

ECHO = ("--pipeline", "custom_pipelines:make")


def _ready_workers(server: Server, count: int) -> list[dict[str, Any]]:
    """Wait until /info lists `count` workers, all ready; return them from a fresh /info."""
    wait_until(lambda: [w["state"] for w in server.info()["workers"]] == ["ready"] * count, 60,
               message=f"{count} workers ready")
    workers = server.info()["workers"]
    assert len(workers) == count, workers
    assert [w["state"] for w in workers] == ["ready"] * count, workers
    assert [w["index"] for w in workers] == list(range(count))
    return workers


def _held_documents(gate: Path) -> list[dict[str, Any]]:
    # Different parameters, so the two can never share one batch.
    return [{"inputs": f"WAIT:{gate}", "parameters": {"suffix": str(i)}} for i in range(2)]


def test_idle_workers_take_batches_in_parallel(start_server: Any, tmp_path: Path) -> None:
    server = start_server(*ECHO, "--workers", "2")
    workers = _ready_workers(server, 2)
    assert len({w["pid"] for w in workers}) == 2
    assert all(w["threads"] == max(1, (os.cpu_count() or 1) // 2) for w in workers)
    gate = tmp_path / "gate"

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        async with client_session() as session:
            async with held_batch(session, server, gate, documents=_held_documents(gate)) as held:
                # Both batches are running at once, before either could finish: side by side.
                during = await asyncio.to_thread(counters, server)
            return held.answers, during

    answers, during = asyncio.run(scenario())
    assert during["in_flight"] == 2 and during["queue_depth"] == 0
    assert [answer.status for answer in answers] == [200, 200]
    assert {answer.body["pid"] for answer in answers} == {w["pid"] for w in workers}


def test_one_worker_dying_leaves_the_other_serving(start_server: Any, tmp_path: Path) -> None:
    env, armed, load_gate = restart_load_gate(tmp_path)
    server = start_server(*ECHO, "--workers", "2", env=env)
    pids = [w["pid"] for w in _ready_workers(server, 2)]
    armed.touch()  # the dead worker's restart waits in its load until load_gate exists
    gate = tmp_path / "gate"

    async def scenario() -> tuple[list[Any], list[Any], int, str, Any, str]:
        async with client_session() as session:
            async with held_batch(session, server, gate, documents=_held_documents(gate)) as held:
                os.kill(pids[0], signal.SIGKILL)
                # Only the dead worker's batch is answered; the other one's is still held.
                first = [task.result() for task in await completed(held.tasks, 1)]
                ready = (await asyncio.to_thread(server.request, "GET", "/ready")).status
                state = (await asyncio.to_thread(server.info))["workers"][0]["state"]
            # Worker 0 is still held in its load: worker 1 answers alone.
            meanwhile = await post(session, server, {"inputs": "meanwhile"})
            state_after = (await asyncio.to_thread(server.info))["workers"][0]["state"]
            return first, held.answers, ready, state, meanwhile, state_after

    try:
        first, answers, ready, state, meanwhile, state_after = asyncio.run(scenario())
    finally:
        load_gate.touch()
    assert [answer.status for answer in first] == [503], first
    assert sorted(answer.status for answer in answers) == [200, 503], answers  # only one batch lost
    assert ready == 200 and state == "restarting"  # the other one still serves
    assert meanwhile.status == 200 and meanwhile.body["pid"] == pids[1]
    assert state_after == "restarting"
    workers = _ready_workers(server, 2)
    assert workers[0]["pid"] != pids[0] and workers[0]["restarts"] == 1
    assert workers[1]["pid"] == pids[1] and workers[1]["restarts"] == 0


def test_one_worker_per_listed_device(start_server: Any, tmp_path: Path) -> None:
    env, armed, load_gate = restart_load_gate(tmp_path)
    server = start_server(*ECHO, "--devices", "cpu,cpu", env=env)
    workers = _ready_workers(server, 2)
    assert [w["device"] for w in workers] == ["cpu", "cpu"]
    armed.touch()
    os.kill(workers[1]["pid"], signal.SIGKILL)
    try:
        wait_until(lambda: server.info()["workers"][1]["state"] == "restarting", 10, message="death noticed")
        reply = server.post_json({"inputs": "the other serves"})
        assert reply.status == 200 and reply.json()["pid"] == workers[0]["pid"]
        assert server.info()["workers"][1]["state"] == "restarting"  # held in its load meanwhile
    finally:
        load_gate.touch()
    after = _ready_workers(server, 2)
    assert [w["restarts"] for w in after] == [0, 1]
    assert after[0]["pid"] == workers[0]["pid"]
    assert after[1]["pid"] not in (workers[0]["pid"], workers[1]["pid"])
    assert [w["device"] for w in after] == ["cpu", "cpu"]


def test_no_workers_flag_means_one_single_threaded_worker_per_core(start_server: Any) -> None:
    from pipeserve.front.machine import MAX_AUTO_WORKERS, cores

    server = start_server(*ECHO, "--device", "cpu", env={"PIPESERVE_WORKERS": "0"})
    expected = min(cores(), MAX_AUTO_WORKERS)
    workers = _ready_workers(server, expected)
    assert all(w["threads"] == max(1, cores() // expected) for w in workers)
    assert server.post_json({"inputs": "served"}).json()["text"] == "served"


def test_no_workers_flag_gives_a_text_generator_one_worker_with_every_core(
        start_server: Any, task_models: dict[str, Path]) -> None:
    from pipeserve.front.machine import cores

    server = start_server("--model", str(task_models["text-generation"]), "--device", "cpu",
                          env={"PIPESERVE_WORKERS": "0"})
    workers = _ready_workers(server, 1)
    assert len(server.info()["workers"]) == 1 and workers[0]["threads"] == cores()
    reply = server.post_json({"inputs": "the good movie", "parameters": {"max_new_tokens": 2}})
    assert reply.status == 200 and "generated_text" in reply.json()[0]
