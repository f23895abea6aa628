"""Load generator: closed loop at C clients, or open loop at R requests/s (Poisson arrivals).

Each request POSTs one text of the seeded mix to 127.0.0.1, in one of two request styles: "hf",
`{"inputs": text}` to / (the Inference API's form, which pipeserve and the baselines take), or
"openai", `{"input": text, "model": NAME}` to /v1/embeddings (OpenAI's embeddings API, for a peer
that speaks only that; --path moves it, infinity-emb serves it at /embeddings). A warm-up period
runs first and is not counted; then the measured period runs for a fixed duration. Bodies are
read but not parsed, so the client spends as little CPU as it can.

    python bench/loadgen.py --port 8000 --closed 64 --duration 15
    python bench/loadgen.py --port 8000 --open 300 --duration 20
    python bench/loadgen.py --port 7997 --closed 64 --style openai --path /embeddings
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import aiohttp

from workload import make_texts

STYLES = ("hf", "openai")
DEFAULT_PATHS = {"hf": "/", "openai": "/v1/embeddings"}
DEFAULT_MODEL = "all-MiniLM-L6-v2"  # the "model" field of the openai style: the name a peer serves it under


@dataclass
class Stats:
    mode: str
    level: float  # C clients, or R requests/s
    duration_s: float
    requests_per_s: float  # 200 answers per second
    counts: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    refused_p50_ms: float | None = None  # latency of 503 answers
    refused_p99_ms: float | None = None
    max_ok_ms: float = 0.0
    # p50 and p99 of the 200s per input length band of the mix (short: ≤ 20 words, medium: ≤ 60, long)
    by_band_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class _Recorder:
    def __init__(self) -> None:
        self.measuring = False
        self.ok: list[float] = []
        self.ok_by_band: dict[str, list[float]] = {}
        self.refused: list[float] = []
        self.counts: Counter[str] = Counter()

    def record(self, status: int | str, seconds: float, band: str = "") -> None:
        self.counts[str(status)] += 1
        if status == 200:
            self.ok.append(seconds * 1000)
            self.ok_by_band.setdefault(band, []).append(seconds * 1000)
        elif status == 503:
            self.refused.append(seconds * 1000)

    def stats(self, mode: str, level: float, duration: float) -> Stats:
        return Stats(
            mode=mode, level=level, duration_s=duration,
            requests_per_s=len(self.ok) / duration,
            counts=dict(self.counts),
            p50_ms=_percentile(self.ok, 50), p90_ms=_percentile(self.ok, 90),
            p99_ms=_percentile(self.ok, 99),
            refused_p50_ms=_percentile(self.refused, 50) if self.refused else None,
            refused_p99_ms=_percentile(self.refused, 99) if self.refused else None,
            max_ok_ms=max(self.ok, default=0.0),
            by_band_ms={band: {"p50": _percentile(values, 50), "p99": _percentile(values, 99)}
                        for band, values in sorted(self.ok_by_band.items())},
        )


def request_body(text: str, style: str = "hf", model: str = DEFAULT_MODEL) -> bytes:
    """The JSON body of one request in the given style."""
    if style == "hf":
        return json.dumps({"inputs": text}).encode()
    if style == "openai":
        return json.dumps({"input": text, "model": model}).encode()
    raise ValueError(f"unknown request style {style!r}, expected one of {STYLES}")


def band(text: str) -> str:
    """The length band of the mix a text is from (bench/workload.py)."""
    words = len(text.split())
    return "short" if words <= 20 else "medium" if words <= 60 else "long"


def _target(port: int, path: str | None, style: str, model: str) -> tuple[str, Iterator[tuple[bytes, str]]]:
    """The URL, and the seeded mix's request bodies (with their length band) in an endless cycle. The
    bodies are made once, before the clock starts, so that the client's CPU goes to sending (an
    unknown style fails here)."""
    bodies = [(request_body(text, style, model), band(text)) for text in make_texts(5000)]
    return f"http://127.0.0.1:{port}{DEFAULT_PATHS[style] if path is None else path}", itertools.cycle(bodies)


async def _one(session: aiohttp.ClientSession, url: str, request: tuple[bytes, str], recorder: _Recorder) -> None:
    """Send one request; it counts if it was sent inside the measured window."""
    body, length_band = request
    measured = recorder.measuring
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            await response.read()
            status: int | str = response.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        status = type(exc).__name__
    if measured:
        recorder.record(status, time.perf_counter() - started, length_band)


async def closed_loop(port: int, clients: int, duration: float, warmup: float, path: str | None = None,
                      style: str = "hf", model: str = DEFAULT_MODEL) -> Stats:
    """C clients, each sending its next request as soon as its last one is answered."""
    url, bodies = _target(port, path, style, model)
    recorder = _Recorder()
    stop_at = time.monotonic() + warmup + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client() -> None:
            while time.monotonic() < stop_at:
                await _one(session, url, next(bodies), recorder)

        async def measure() -> None:
            await asyncio.sleep(warmup)
            recorder.measuring = True
            await asyncio.sleep(duration)
            recorder.measuring = False

        await asyncio.gather(measure(), *(client() for _ in range(clients)))
    return recorder.stats("closed", clients, duration)


async def open_loop(port: int, rate: float, duration: float, warmup: float, seed: int = 7,
                    path: str | None = None, style: str = "hf", model: str = DEFAULT_MODEL) -> Stats:
    """Poisson arrivals at R requests/s, whether or not earlier ones were answered."""
    url, bodies = _target(port, path, style, model)
    rng = random.Random(seed)
    recorder = _Recorder()
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.monotonic()
        next_at = started
        while True:
            now = time.monotonic()
            elapsed = now - started
            if elapsed >= warmup + duration:
                break
            recorder.measuring = elapsed >= warmup
            if now < next_at:
                await asyncio.sleep(next_at - now)
                continue
            task = asyncio.ensure_future(_one(session, url, next(bodies), recorder))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(rate)
        if tasks:  # requests sent inside the window count when they finish after it
            await asyncio.wait(tasks, timeout=60)
    return recorder.stats("open", rate, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--closed", type=int, metavar="C", help="closed loop with C clients")
    group.add_argument("--open", type=float, metavar="R", help="open loop at R requests/s")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--style", choices=STYLES, default="hf", help="request body and default path")
    parser.add_argument("--path", help="POST path (default: / for hf, /v1/embeddings for openai)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the openai style's model name")
    args = parser.parse_args()
    target = {"path": args.path, "style": args.style, "model": args.model}
    if args.closed:
        stats = asyncio.run(closed_loop(args.port, args.closed, args.duration, args.warmup, **target))
    else:
        stats = asyncio.run(open_loop(args.port, args.open, args.duration, args.warmup, **target))
    print(json.dumps({k: v for k, v in asdict(stats).items() if k != "latencies_ms"}, indent=2))


if __name__ == "__main__":
    main()
