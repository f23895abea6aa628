"""What the worker's memory settings cost and save: the model process's work alone, A/B.

    .venv/bin/python bench/memory_ab.py                  # bf16 and fp32, 120 s each variant, twice; writes bench/MEMORY.md
    .venv/bin/python bench/memory_ab.py --seconds 20 --output /tmp/memory.md

Each variant runs in a fresh process: the embedded all-MiniLM-L6-v2 loaded as pipeserve's worker
loads it (`loading.load`, one torch thread), then the same seeded sequence of batches (1–32 texts
of the bench mix, length-sorted, as the batcher forms them) for a fixed time. Recorded: batches
and items per second, and RSS after the first batch and at the end. Variants:

- before: torch's per-shape CPU kernel caches at their defaults (1024 entries each) and glibc's
  malloc as it comes, as the worker ran until this round;
- now: what the worker does where tcmalloc is installed: ideep's cache off, oneDNN's bounded at
  256 (`model_proc._bound_shape_caches`), tcmalloc preloaded (`front/allocator.py`);
- now-glibc: what it does without tcmalloc: the same caches, glibc's heap trimmed after each batch
  (`model_proc._free_memory_returner`);
- bounded-caches-untrimmed-glibc, torch-caches-trimmed-glibc, jemalloc: one change at a time.

Variants alternate (before, now, before, now) so that a slow minute of the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

TORCH_DEFAULT_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}
TCMALLOC = {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
# name -> (environment over the shipped one, do what the worker does after each batch: trim
# glibc's heap unless another allocator is loaded)
VARIANTS: dict[str, tuple[dict[str, str], bool]] = {
    "before": (TORCH_DEFAULT_CACHES, False),
    "now": (TCMALLOC, True),
    "now-glibc": ({}, True),
    "bounded-caches-untrimmed-glibc": ({}, False),
    "torch-caches-trimmed-glibc": (TORCH_DEFAULT_CACHES, True),
    "jemalloc": ({"LD_PRELOAD": "libjemalloc.so.2"}, False),
}
DEFAULT_VARIANTS = "before,now,now-glibc"


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, dtype: str, seconds: float) -> dict[str, Any]:
    """One variant's run, in this (fresh) process."""
    from pipeserve import model_proc

    environment, as_the_worker = VARIANTS[variant]
    os.environ.update(environment)
    model_proc._bound_shape_caches(os.environ)  # what the variant does not set, as shipped
    return_free_memory = lambda: None  # noqa: E731
    if as_the_worker:
        return_free_memory = model_proc._free_memory_returner(model_proc._allocator())
    import torch

    from pipeserve import ipc
    from pipeserve.model import loading
    from run_all import model_folder
    from workload import make_texts

    torch.set_num_threads(1)
    spec = ipc.WorkerSpec(model=model_folder(), task=None, pipeline=None, device="cpu", dtype=dtype, threads=1,
                          max_worker_memory=None, log_level="warning")
    call, chosen = loading.load(spec, "cpu", torch)
    texts = make_texts(5000)
    rng = random.Random(1)
    call(sorted(rng.sample(texts, 8), key=len), {})
    first_rss = _rss_mb()
    batches = items = 0
    free_s = 0.0
    rss_by_quarter: list[int] = []
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        batch = sorted(rng.sample(texts, rng.randint(1, 32)), key=len)
        call(batch, {})
        freeing = time.perf_counter()
        return_free_memory()
        free_s += time.perf_counter() - freeing
        batches += 1
        items += len(batch)
        if elapsed >= seconds * (len(rss_by_quarter) + 1) / 4:
            rss_by_quarter.append(round(_rss_mb()))
    elapsed = time.perf_counter() - started
    rss_by_quarter.append(round(_rss_mb()))
    return {"variant": variant, "dtype": chosen.dtype, "items_per_s": items / elapsed,
            "batches": batches, "rss_first_mb": first_rss, "rss_end_mb": _rss_mb(),
            "rss_by_quarter_mb": rss_by_quarter, "free_ms_per_batch": free_s * 1000 / batches}


def run(variant: str, dtype: str, seconds: float) -> dict[str, Any]:
    env = {name: value for name, value in os.environ.items() if name not in TORCH_DEFAULT_CACHES}
    env.update(VARIANTS[variant][0])  # before the process starts: LD_PRELOAD is read by the loader
    command = [sys.executable, __file__, "--child", variant, "--dtype", dtype, "--seconds", str(seconds)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                            timeout=seconds + 300).stdout
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


def render(rows: list[dict[str, Any]], command: str, seconds: float, variants: list[str]) -> str:
    from run_all import machine

    m = machine()
    lines = [
        "# Worker memory settings, A/B",
        "",
        f"Measured {m['date']} at commit {m['commit']} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}: "
        f"the model process's work alone (see the docstring of `bench/memory_ab.py`), {seconds:g} s per "
        "run, the same seeded batches in every run. Reproduce:",
        "",
        "```sh",
        command,
        "```",
        "",
        "| dtype | variant | items/s (median) | batches | RSS after 1st batch MiB | RSS at each quarter (first run) MiB | growth MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in dict.fromkeys(row["dtype_asked"] for row in rows):
        for variant in variants:
            runs = [r for r in rows if r["dtype_asked"] == dtype and r["variant"] == variant]
            if not runs:
                continue
            speed = statistics.median(r["items_per_s"] for r in runs)
            first = statistics.median(r["rss_first_mb"] for r in runs)
            end = statistics.median(r["rss_end_mb"] for r in runs)
            lines.append(f"| {runs[0]['dtype']} | {variant} | {speed:.1f} | {statistics.median(r['batches'] for r in runs):.0f} | "
                         f"{first:.0f} | {' / '.join(map(str, runs[0]['rss_by_quarter_mb']))} | {end - first:+.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dtypes", default="auto,float32", help="comma-separated --dtype values to compare")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {'; '.join(VARIANTS)}")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(BENCH / "MEMORY.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.seconds)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        for _ in range(args.repeats):
            for variant in args.variants.split(","):
                row = {**run(variant, dtype, args.seconds), "dtype_asked": dtype}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.output).write_text(render(rows, " ".join(["python", "bench/memory_ab.py", *sys.argv[1:]]),
                                        args.seconds, args.variants.split(",")))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
