"""Chaos soak: steady load while the model process is killed, SIGKILL and SIGSEGV alternately.

    .venv/bin/python bench/chaos.py                 # 10 minutes, a kill every 30 s; writes bench/CHAOS.md
    .venv/bin/python bench/chaos.py --minutes 1 --every 10

Closed-loop clients send one text each, one request after another, with a client-side timeout
a little past the server's --request-timeout; after a 503 a client waits as Retry-After says
(at most 1 s). Every answer is classified: 200, 503 with
Retry-After, anything else (a 5xx other than 503, a 503 without Retry-After, a 504), a reset or
refused connection, or no answer by the deadline. The run passes when only the first two occur.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from workload import make_texts  # noqa: E402

REQUEST_TIMEOUT_S = 30.0
KILLS = (signal.SIGKILL, signal.SIGSEGV)


async def _worker_pid(session: aiohttp.ClientSession, base: str) -> int | None:
    async with session.get(base + "/info") as response:
        worker = (await response.json())["workers"][0]
        return int(worker["pid"]) if worker["state"] == "ready" and worker["pid"] else None


async def soak(port: int, seconds: float, every: float, clients: int) -> dict[str, object]:
    """Load for `seconds`, killing the ready worker every `every` seconds; the outcome counts."""
    base = f"http://127.0.0.1:{port}"
    outcomes: Counter[str] = Counter()
    kills: list[str] = []
    texts = make_texts(2000)
    stop_at = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S + 5)

    async def client(index: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = index
            while time.monotonic() < stop_at:
                n += clients
                try:
                    async with session.post(base + "/", json={"inputs": texts[n % len(texts)]}) as response:
                        await response.read()
                        if response.status == 200:
                            outcomes["200"] += 1
                        elif response.status == 503 and "Retry-After" in response.headers:
                            outcomes["503+Retry-After"] += 1
                            # as a client should: wait as told (capped, to keep probing the restart)
                            await asyncio.sleep(min(float(response.headers["Retry-After"]), 1.0))
                        else:
                            outcomes[f"other {response.status}"] += 1
                except TimeoutError:
                    outcomes["no answer by the deadline"] += 1
                except aiohttp.ClientError as exc:
                    outcomes[f"connection error {type(exc).__name__}"] += 1

    async def killer() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while time.monotonic() + every < stop_at:
                await asyncio.sleep(every)
                pid = await _worker_pid(session, base)
                if pid is not None:
                    sig = KILLS[len(kills) % 2]
                    os.kill(pid, sig)
                    kills.append(sig.name)

    await asyncio.gather(killer(), *(client(index) for index in range(clients)))
    return {"outcomes": dict(outcomes), "kills": kills}


def passed(result: dict[str, object]) -> bool:
    outcomes = result["outcomes"]
    assert isinstance(outcomes, dict)
    return set(outcomes) <= {"200", "503+Retry-After"} and outcomes.get("200", 0) > 0


def main() -> None:
    from run_all import PIPESERVE, Running, machine

    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every", type=float, default=30)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    server = Running(PIPESERVE + ["--workers", "1"], "/ready")  # the one worker is killed: every 503 is seen
    try:
        result = asyncio.run(soak(server.port, args.minutes * 60, args.every, args.clients))
        alive = server.process.poll() is None
    finally:
        server.stop()
    facts = machine()
    outcomes = result["outcomes"]
    lines = ["# Chaos soak", "",
             f"Measured {facts['date']} at commit {facts['commit']} on {facts['cores']} cores ({facts['cpu']}) with "
             f"`python bench/chaos.py --minutes {args.minutes:g} --every {args.every:g} --clients {args.clients}`: "
             "pipeserve defaults (the embedded all-MiniLM-L6-v2), closed-loop clients, the ready worker killed "
             "every interval, SIGKILL and SIGSEGV alternately.", "",
             "| outcome | count |", "|---|---|",
             *(f"| {name} | {count} |" for name, count in sorted(outcomes.items())),  # type: ignore[union-attr]
             "", f"Kills: {len(result['kills'])} ({', '.join(result['kills'])}).",  # type: ignore[arg-type]
             f"Front still serving at the end: {alive}. Passed (only 200 and 503 + Retry-After): {passed(result)}."]
    (BENCH / "CHAOS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
