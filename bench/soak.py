"""Memory soak: steady load for a long time, the front's and the worker's RSS sampled throughout.

    .venv/bin/python bench/soak.py                       # 30 minutes at 32 clients; writes bench/SOAK.md
    .venv/bin/python bench/soak.py --minutes 6 --output /tmp/soak.md -- --dtype float32

Arguments after `--` go to `python -m pipeserve`. Closed-loop clients send one text of the
seeded mix each, one request after another. Every `--sample` seconds the run records the
requests answered 200 in that interval and the RSS of the front and of each model process
(/proc). The verdict compares the worker's RSS at minute 5 (allocator and caches warm) with the
end (growth ≤ 5 %), the front's (≤ 2 MiB), and the throughput of the first and last thirds after
minute 5 (the same, within 3 %, i.e. nothing slows as it ages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_all import Running, machine, tree_rss_mb  # noqa: E402
from workload import make_texts  # noqa: E402

WARM_S = 300.0  # the verdict's baseline: minute 5


async def soak(running: Running, seconds: float, clients: int, sample_s: float) -> list[dict[str, float]]:
    """Load for `seconds`; one sample (time, 200s in the interval, front and worker RSS) per interval."""
    base = f"http://127.0.0.1:{running.port}/"
    texts = make_texts(5000)
    answered = [0]
    failed = [0]
    started = time.monotonic()
    stop_at = started + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        n = index
        while time.monotonic() < stop_at:
            n += clients
            try:
                async with session.post(base, json={"inputs": texts[n % len(texts)]}) as response:
                    await response.read()
                    if response.status == 200:
                        answered[0] += 1
                    else:
                        failed[0] += 1
            except (TimeoutError, aiohttp.ClientError):
                failed[0] += 1

    async def sampler() -> list[dict[str, float]]:
        samples = []
        last = 0
        while time.monotonic() < stop_at:
            await asyncio.sleep(sample_s)
            sizes = tree_rss_mb(running.process.pid)
            front = sizes.pop(str(running.process.pid), 0.0)
            samples.append({"t_s": round(time.monotonic() - started, 1), "ok": answered[0] - last,
                            "failed": failed[0], "front_mb": round(front, 1),
                            "worker_mb": round(max(sizes.values(), default=0.0), 1)})
            last = answered[0]
            print(f"  {samples[-1]}", flush=True)
        return samples

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(sampler(), *(client(i, session) for i in range(clients)))
    return results[0]  # type: ignore[no-any-return]


def verdict(samples: list[dict[str, float]], sample_s: float) -> dict[str, Any]:
    warm = [s for s in samples if s["t_s"] >= WARM_S - sample_s / 2]
    if len(warm) < 3:
        return {"complete": False}
    first, last = warm[0], warm[-1]
    third = max(1, len(warm) // 3)
    early = sum(s["ok"] for s in warm[:third]) / (third * sample_s)
    late = sum(s["ok"] for s in warm[-third:]) / (third * sample_s)
    return {
        "complete": True,
        "worker_growth_pct": round(100 * (last["worker_mb"] / first["worker_mb"] - 1), 2),
        "front_growth_mb": round(last["front_mb"] - first["front_mb"], 2),
        "early_req_s": round(early, 1), "late_req_s": round(late, 1),
        "throughput_change_pct": round(100 * (late / early - 1), 2),
        "failed": last["failed"],
    }


def render(result: dict[str, Any]) -> str:
    v = result["verdict"]
    m = result["machine"]
    lines = [
        "# Memory soak",
        "",
        f"Measured {m['date']} at commit {m['commit']} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"transformers {m['transformers']}: `python -m pipeserve {' '.join(result['server_args'])}` (the "
        f"embedded all-MiniLM-L6-v2), {result['clients']} closed-loop clients over the seeded length mix "
        f"for {result['minutes']:g} minutes, RSS sampled every {result['sample_s']:g} s. Reproduce:",
        "",
        "```sh",
        result["command"],
        "```",
        "",
    ]
    if v.get("complete"):
        checks = [
            ("worker RSS growth from minute 5 to the end ≤ 5 %", f"{v['worker_growth_pct']:+.2f} %",
             v["worker_growth_pct"] <= 5),
            ("front RSS growth from minute 5 ≤ 2 MiB", f"{v['front_growth_mb']:+.2f} MiB", v["front_growth_mb"] <= 2),
            ("throughput, last third vs first third after minute 5, within 3 %",
             f"{v['early_req_s']} → {v['late_req_s']} req/s ({v['throughput_change_pct']:+.2f} %)",
             abs(v["throughput_change_pct"]) <= 3),
            ("every request answered 200", f"{v['failed']} not 200", v["failed"] == 0),
        ]
        lines += ["| check | measured | verdict |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'met' if ok else '**missed**'} |" for name, value, ok in checks]
    else:
        lines.append("The run ended before minute 5: no verdict.")
    lines += ["", "| t (s) | 200s in interval | front RSS MiB | worker RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {s['t_s']:.0f} | {s['ok']} | {s['front_mb']} | {s['worker_mb']} |" for s in result["samples"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--output", default=str(BENCH / "SOAK.md"))
    parser.add_argument("server_args", nargs="*", help="after --: arguments for python -m pipeserve")
    args = parser.parse_args()
    server_args = ["--log-level", "warning", *args.server_args]
    running = Running([sys.executable, "-m", "pipeserve", *server_args], "/ready")
    try:
        samples = asyncio.run(soak(running, args.minutes * 60, args.clients, args.sample))
    finally:
        running.stop()
    result = {"machine": machine(), "server_args": server_args, "clients": args.clients, "minutes": args.minutes,
              "sample_s": args.sample, "samples": samples, "verdict": verdict(samples, args.sample),
              "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]])}
    (BENCH / "out").mkdir(exist_ok=True)
    (BENCH / "out" / "soak.json").write_text(json.dumps(result, indent=2))
    Path(args.output).write_text(render(result))
    print(json.dumps(result["verdict"]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
