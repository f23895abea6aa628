"""How long does a one-text request wait while a client batch of 1000 texts is being served?

    .venv/bin/python bench/fairness.py          # writes bench/FAIRNESS.md

One pipeserve (defaults, the embedded all-MiniLM-L6-v2) on a free loopback port. Three phases,
each with probes: single-text requests sent one after another, the next as soon as the last
answered, and their latencies recorded.
1. idle: probes alone.
2. windowed: probes while one POST /v1/embeddings request carries 1000 texts; pipeserve lets it
   into the queue a window at a time (2 x --max-batch-size x workers inputs).
3. all at once: probes while the same 1000 texts arrive as 1000 concurrent one-text requests
   (with --max-queue 2048 and --max-connections 4096 so that none is refused): every input is queued before the probe,
   which is what a request of 1000 inputs would do without windows.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_all import PIPESERVE, Running, machine  # noqa: E402
from workload import make_texts  # noqa: E402

BIG = 1000


async def _probe(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, texts: list[str]) -> list[float]:
    latencies = []
    for text in texts:
        if stop.is_set():
            break
        started = time.perf_counter()
        async with session.post(url + "/", json={"inputs": text}) as response:
            await response.read()
            assert response.status == 200, response.status
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def _phase(url: str, mode: str, texts: list[str], probes: list[str]) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = asyncio.Event()
        started = time.perf_counter()
        if mode == "idle":
            latencies = await _probe(session, url, stop, probes)
            return {"probe_p50_ms": statistics.median(latencies), "probe_max_ms": max(latencies),
                    "probes": len(latencies), "big_s": 0.0}

        async def big() -> None:
            if mode == "windowed":
                async with session.post(url + "/v1/embeddings", json={"input": texts}) as response:
                    await response.read()
                    assert response.status == 200, response.status
            else:
                async def one(text: str) -> None:
                    async with session.post(url + "/", json={"inputs": text}) as response:
                        await response.read()
                        assert response.status == 200, response.status
                await asyncio.gather(*(one(text) for text in texts))
            stop.set()

        big_task = asyncio.create_task(big())
        await asyncio.sleep(0.2)  # the big request is in: its inputs are queued or in windows
        latencies = await _probe(session, url, stop, probes)
        await big_task
        return {"probe_p50_ms": statistics.median(latencies), "probe_max_ms": max(latencies),
                "probes": len(latencies), "big_s": time.perf_counter() - started}


def main() -> None:
    texts = make_texts(BIG)
    probes = make_texts(400)[-200:]
    rows = []
    for mode, extra in (("idle", []), ("windowed", []), ("all at once", ["--max-queue", "2048", "--max-connections", "4096"])):
        server = Running([*PIPESERVE, *extra], "/ready")
        try:
            rows.append((mode, asyncio.run(_phase(f"http://127.0.0.1:{server.port}", mode, texts, probes))))
        finally:
            server.stop()
    facts = machine()
    lines = [
        "# Fairness: a one-text request during a 1000-text request",
        "",
        f"Measured {facts['date']} at commit {facts['commit']} on {facts['cores']} cores ({facts['cpu']}) with "
        "`python bench/fairness.py` (pipeserve defaults, the embedded all-MiniLM-L6-v2, the seeded "
        "length mix). Probes are sequential one-text requests sent while the big request runs.",
        "",
        "| phase | probe p50 ms | probe max ms | probes answered | big request s |",
        "|---|---|---|---|---|",
    ]
    for mode, row in rows:
        lines.append(f"| {mode} | {row['probe_p50_ms']:.1f} | {row['probe_max_ms']:.1f} | {row['probes']} | "
                     f"{row['big_s']:.2f} |")
    (BENCH / "FAIRNESS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
