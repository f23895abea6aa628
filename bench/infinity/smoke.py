"""Seconds-long check of the three infinity-emb servers that bench/run_all.py measures.

Each is started as run_all starts it (its SERVERS entry, a free loopback port), timed until
ready, sent 3 texts (each must come back as a 384-dim vector), then 20 texts of the benchmark's
mix, whose vectors are compared with the torch fp32 engine's (cosine, row by row). Run it from
the repository root with pipeserve's interpreter, after bench/infinity/setup.sh:

    .venv/bin/python bench/infinity/smoke.py
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
import run_all  # noqa: E402
from workload import make_texts  # noqa: E402

DIMENSIONS = 384  # all-MiniLM-L6-v2's hidden size


def embed(port: int, server: run_all.Server, texts: list[str]) -> np.ndarray:
    """One OpenAI-style request with all the texts: [len(texts), dim], in input order."""
    body = json.dumps({"input": texts, "model": loadgen.DEFAULT_MODEL}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{server.path}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        rows = sorted(json.loads(response.read())["data"], key=lambda row: row["index"])
    return np.array([row["embedding"] for row in rows], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def check(name: str, server: run_all.Server, texts: list[str]) -> np.ndarray:
    """Start, time, probe and stop one server; its vectors for `texts`."""
    started = time.monotonic()
    running = run_all.Running(server.command, server.ready_path)
    try:
        print(f"-- {name}: ready in {time.monotonic() - started:.1f} s", flush=True)
        three = embed(running.port, server, texts[:3])
        if three.shape != (3, DIMENSIONS):
            raise SystemExit(f"   expected 3 x {DIMENSIONS} vectors, got {three.shape}")
        print(f"   3 texts -> {three.shape[0]} x {three.shape[1]}, norms {np.linalg.norm(three, axis=1).round(4)}")
        return embed(running.port, server, texts)
    finally:
        running.stop()


def main() -> None:
    names = [name for name in run_all.SERVERS if name.startswith("infinity-emb")]
    if absent := [path for name in names for path in run_all.missing(run_all.SERVERS[name])]:
        raise SystemExit(f"missing: {', '.join(map(str, absent))} (bash bench/infinity/setup.sh makes them)")
    texts = make_texts(20)
    vectors = {name: check(name, run_all.SERVERS[name], texts) for name in names}
    reference = vectors[names[0]]  # the torch fp32 engine
    for name in names[1:]:
        found = cosines(vectors[name], reference)
        print(f"{name} vs torch fp32: cosine min {found.min():.5f} mean {found.mean():.5f}")


if __name__ == "__main__":
    main()
