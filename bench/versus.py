"""Two servers of run_all.py in alternating rounds at C=64: is a ratio between them steady?

    .venv/bin/python bench/versus.py --rounds 3 --output /tmp/VERSUS.md \\
        "pipeserve defaults (no flags: 2 workers x 1 thread, --dtype auto = bf16 here)" \\
        "infinity-emb 0.0.78 ONNX int8, dynamic QInt8 per channel (batch 32, 1 process, all cores)"

One `run_all.py` measures each server once, so a ratio against a peer moves with the peer's
run-to-run spread (infinity-emb's int8 engine: 126-173 req/s over four runs here). This starts
the two servers (names as in bench/RESULTS.md) one after the other, A B A B ..., each alone,
and reports both servers' req/s and p99 and their ratios for every round.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
from run_all import SERVERS, closed_loop_alone, machine  # noqa: E402


def measure(name: str, clients: int, seconds: float) -> loadgen.Stats:
    spec = SERVERS[name]
    return closed_loop_alone(spec.command, spec.ready_path, clients, seconds, path=spec.path, style=spec.style)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", choices=list(SERVERS))
    parser.add_argument("second", choices=list(SERVERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--output", default="/dev/stdout")
    args = parser.parse_args()
    m = machine()
    lines = [f"Measured {m['date']} at commit {m['commit']} on {m['cores']} cores ({m['cpu']}): C={args.clients} "
             f"closed loop, {args.seconds:g} s measured per server and round. Reproduce:", "", "```sh",
             shlex.join(["python", "bench/versus.py", *sys.argv[1:]]), "```", "",
             "| round | first req/s | first p99 ms | second req/s | second p99 ms | req/s ratio | p99 ratio |",
             "|---|---|---|---|---|---|---|"]
    for index in range(args.rounds):
        first = measure(args.first, args.clients, args.seconds)
        second = measure(args.second, args.clients, args.seconds)
        lines.append(f"| {index + 1} | {first.requests_per_s:.1f} | {first.p99_ms:.0f} | {second.requests_per_s:.1f} | "
                     f"{second.p99_ms:.0f} | {first.requests_per_s / second.requests_per_s:.2f}x | "
                     f"{first.p99_ms / second.p99_ms:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"first: {args.first}; second: {args.second}"]
    Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
