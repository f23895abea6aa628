"""A decoding step in-process: the engine on bench/LLAMACPP.md's model, transformers' forward
against model/lean_decode.py's path, in the same process, rounds interleaved (this box's speed
drifts between runs; a pair within one round is what compares). From the repo root, after
`.venv/bin/python bench/llamacpp/model.py --hf-only`:

    .venv/bin/python bench/decode_step.py            # writes bench/DECODE_STEP.md

For each precision and each number of streams: the median step (every stream one token) over
STEPS steps, per round; the same greedy tokens both ways is checked, not assumed. Last, int8 at
one stream with every product made free (each int8 layer answers zeros at once): what a step
costs besides its products, both ways.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
MODEL = BENCH / "out" / "llama-small-random"
STEPS = 40
PROMPT = "Hello there, tell me a story about the sea and the ships, number {}."


def _engine(dtype: str) -> Any:
    import torch

    from pipeserve import ipc
    from pipeserve.model import loading
    from pipeserve.model.generation import Engine

    torch.set_num_threads(2)
    spec = ipc.WorkerSpec(model=str(MODEL), task=None, pipeline=None, device="cpu", dtype=dtype, threads=2,
                          max_worker_memory=None, log_level="warning")
    call, _ = loading.load(spec, "cpu", torch)
    return Engine(call.pipe.model, call.pipe.tokenizer, 32)


def _steps(engine: Any, streams: int, steps: int) -> tuple[list[float], list[tuple[int, int]]]:
    """Run `streams` sequences of `steps` + 2 tokens: each decoding step's time (all streams
    running), and every token."""
    from pipeserve import ipc

    for stream in range(streams):
        engine.add(ipc.Generate(stream, PROMPT.format(stream), {"max_new_tokens": steps + 2, "ignore_eos": True}))
    while engine.waiting:
        engine.step()
    times, tokens = [], []
    while engine.active:
        started = time.perf_counter()
        step = engine.step()
        times.append(time.perf_counter() - started)
        tokens += [(token.stream_id, token.id) for token in step.tokens]
    return times[:-2], tokens  # the last steps: streams leaving


def measure(dtype: str, streams: int, rounds: int) -> dict[str, Any]:
    engine = _engine(dtype)
    lean = engine._lean
    if lean is None:
        raise SystemExit(f"{dtype}: the lean path did not pass its check on this model")
    ways = {"transformers": None, "lean": lean}
    medians: dict[str, list[float]] = {way: [] for way in ways}
    same_tokens = True
    for path in ways.values():  # warm both
        engine._lean = path
        _steps(engine, streams, 4)
    for round_ in range(rounds):
        tokens: dict[str, list[tuple[int, int]]] = {}
        for way in sorted(ways, reverse=bool(round_ % 2)):  # each goes first in every other round
            engine._lean = ways[way]
            times, tokens[way] = _steps(engine, streams, STEPS)
            medians[way].append(statistics.median(times) * 1e3)
        same_tokens = same_tokens and tokens["transformers"] == tokens["lean"]
    return {"dtype": dtype, "streams": streams, "medians": medians, "same_tokens": same_tokens}


def overhead(rounds: int) -> dict[str, Any]:
    """int8, one stream: each way's step with every product made free (an int8 layer answers a
    kept zero row at once), so step minus this is what the products cost, and this is the rest."""
    import torch

    from pipeserve.model import weight_int8

    layer_class = weight_int8._layer_class(torch, weight_int8.quantizes_activations(torch))
    own = layer_class.forward
    zeros: dict[tuple[tuple[int, ...], Any], Any] = {}

    def free(self: Any, x: Any) -> Any:
        shape = (*x.shape[:-1], self.out_features)
        if (shape, x.dtype) not in zeros:
            zeros[shape, x.dtype] = torch.zeros(shape, dtype=x.dtype)
        return zeros[shape, x.dtype]

    layer_class.forward = free
    try:
        row = measure("int8", 1, rounds)
    finally:
        layer_class.forward = own
    return {**row, "dtype": "int8, products made free", "same_tokens": None}


def report(rows: list[dict[str, Any]], command: str) -> str:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH).stdout.strip()
    lines = [
        "# A decoding step: transformers' forward against the lean path (model/lean_decode.py)", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit} on this project's "
        f"2-core box ({platform.processor() or platform.machine()}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, with `{command}`. In-process: the engine alone, no server; "
        f"bench/LLAMACPP.md's model (a random Llama of GPT-2-small cost); each round runs both ways, "
        f"{STEPS} steps each, and a cell is that round's median step. Ratio: the median of the rounds' "
        "lean/transformers ratios.", "",
        "| precision | streams | transformers, ms per round | lean, ms per round | lean / transformers | same tokens |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        theirs, ours = row["medians"]["transformers"], row["medians"]["lean"]
        ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
        lines.append(f"| {row['dtype']} | {row['streams']} | {' '.join(f'{x:.1f}' for x in theirs)} | "
                     f"{' '.join(f'{x:.1f}' for x in ours)} | {ratio:.2f} | {_same(row['same_tokens'])} |")
    return "\n".join(lines) + "\n"


def _same(same: bool | None) -> str:
    return "-" if same is None else "yes" if same else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="int8,bfloat16,float32")
    parser.add_argument("--streams", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=str(BENCH / "DECODE_STEP.md"))
    parser.add_argument("--no-overhead", action="store_true", help="skip the int8 step with its products made free")
    args = parser.parse_args()
    rows = [measure(dtype, int(streams), args.rounds)
            for dtype in args.dtypes.split(",") for streams in args.streams.split(",")]
    if not args.no_overhead:
        rows.append(overhead(args.rounds))
    text = report(rows, " ".join([".venv/bin/python", "bench/decode_step.py", *sys.argv[1:]]))
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
