"""In-process limits: the raw transformers pipeline, no server, one torch thread per process.

Modes, over the same seeded texts: arrival order in batches of 1, 8 and 32, and length-sorted
windows of 64 cut into batches of 8 (what a length-aware batcher can at best achieve). With
--processes N, N copies run side by side (one per core) and their items/s are summed.

    python bench/inprocess.py --processes 2 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from multiprocessing import get_context

from workload import make_texts

MODES = ("arrival-1", "arrival-8", "arrival-32", "sorted64-8")


def _batches(texts: list[str], mode: str) -> Iterator[list[str]]:
    if mode.startswith("arrival-"):
        size = int(mode.split("-")[1])
        for start in range(0, len(texts), size):
            yield texts[start:start + size]
    else:
        for start in range(0, len(texts), 64):
            window = sorted(texts[start:start + 64], key=len)
            for inner in range(0, len(window), 8):
                yield window[inner:inner + 8]


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _run(mode: str, seconds: float, offset: int, result: dict) -> None:  # in a child process
    import torch
    from transformers import pipeline

    from pipeserve.front.runtime import default_model_path

    torch.set_num_threads(1)
    pipe = pipeline("feature-extraction", model=default_model_path(), device="cpu")
    pipe.tokenizer.model_max_length = 256
    texts = make_texts(4000)[offset:] + make_texts(4000)[:offset]
    pipe(texts[:16], batch_size=8, truncation=True, return_tensors=True)  # warm-up
    items, started = 0, time.perf_counter()
    for batch in _batches(texts, mode):
        pipe(batch, batch_size=len(batch), truncation=True, return_tensors=True)
        items += len(batch)
        if time.perf_counter() - started >= seconds:
            break
    result["items_per_s"] = items / (time.perf_counter() - started)
    result["rss_mb"] = _rss_mb()


def measure(mode: str, processes: int, seconds: float) -> dict[str, float]:
    context = get_context("spawn")
    with context.Manager() as manager:
        results = [manager.dict() for _ in range(processes)]
        workers = [context.Process(target=_run, args=(mode, seconds, 997 * i, results[i]))
                   for i in range(processes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        values = [dict(r) for r in results]
    return {"items_per_s": sum(v["items_per_s"] for v in values),
            "rss_mb": max(v["rss_mb"] for v in values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    print(json.dumps({mode: measure(mode, args.processes, args.seconds) for mode in args.modes}, indent=2))


if __name__ == "__main__":
    main()
