"""Several model processes behind one front: parallel batches, independent supervision."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp

from conftest import wait_until

ECHO = ("--pipeline", "custom_pipelines:make")


async def _post(session: aiohttp.ClientSession, port: int, text: str, suffix: str = "") -> tuple[int, Any]:
    document = {"inputs": text, "parameters": {"suffix": suffix}}
    async with session.post(f"http://127.0.0.1:{port}/", json=document) as response:
        return response.status, await response.json()


def _all_ready(server: Any) -> list[dict[str, Any]]:
    workers = server.info()["workers"]
    return workers if all(w["state"] == "ready" for w in workers) else []


def test_idle_workers_take_batches_in_parallel(start_server: Any) -> None:
    server = start_server(*ECHO, "--workers", "2")
    workers = wait_until(lambda: _all_ready(server), 60, message="both workers ready")
    assert [w["state"] for w in workers] == ["ready", "ready"]
    assert len({w["pid"] for w in workers}) == 2
    assert all(w["threads"] == max(1, (os.cpu_count() or 1) // 2) for w in workers)

    async def scenario() -> tuple[list[Any], float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            started = time.monotonic()
            # Different parameters, so the two can never share one batch.
            results = await asyncio.gather(*(_post(session, server.port, "SLEEP:1.5", str(i))
                                             for i in range(2)))
            return list(results), time.monotonic() - started

    results, elapsed = asyncio.run(scenario())
    assert [status for status, _ in results] == [200, 200]
    assert {body["pid"] for _, body in results} == {w["pid"] for w in workers}
    assert elapsed < 2.8, "two 1.5 s batches should have run side by side"


def test_one_worker_dying_leaves_the_other_serving(start_server: Any) -> None:
    server = start_server(*ECHO, "--workers", "2")
    pids = [w["pid"] for w in wait_until(lambda: _all_ready(server), 60, message="both ready")]

    async def scenario() -> list[Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            slow = [asyncio.ensure_future(_post(session, server.port, "SLEEP:3", str(i))) for i in range(2)]
            await asyncio.to_thread(wait_until, lambda: server.info()["counters"]["in_flight"] == 2, 10,
                                    message="both workers busy")
            os.kill(pids[0], signal.SIGKILL)
            return list(await asyncio.gather(*slow))

    results = asyncio.run(scenario())
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 503], results  # only the dead worker's batch is lost
    assert server.request("GET", "/ready").status == 200  # the other one still serves
    assert server.post_json({"inputs": "meanwhile"}).status == 200
    workers = wait_until(lambda: _all_ready(server), 60, message="the dead worker to come back")
    assert workers[0]["pid"] != pids[0] and workers[0]["restarts"] == 1
    assert workers[1]["pid"] == pids[1] and workers[1]["restarts"] == 0


def test_one_worker_per_listed_device(start_server: Any) -> None:
    server = start_server(*ECHO, "--devices", "cpu,cpu")
    workers = wait_until(lambda: _all_ready(server), 60, message="both workers ready")
    assert [w["device"] for w in workers] == ["cpu", "cpu"]
    os.kill(workers[1]["pid"], signal.SIGKILL)
    wait_until(lambda: server.info()["workers"][1]["state"] != "ready", 5, message="death noticed")
    assert server.post_json({"inputs": "the other serves"}).status == 200
    workers = wait_until(lambda: (w := _all_ready(server)) and w[1]["restarts"] == 1 and w, 60,
                         message="worker 1 back")
    assert workers[0]["restarts"] == 0 and workers[1]["pid"] != workers[0]["pid"]
