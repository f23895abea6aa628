"""Side-by-side settings of pipeserve at one concurrency: the measurements behind a default.

    .venv/bin/python bench/tuning.py --output bench/TUNING.md \\
        --setting "2x1" -- --workers 2 --threads 1 \\
        --setting "2x1, shortest first 250 ms" -- --workers 2 --threads 1 --shortest-first-ms 250

Each `--setting NAME -- FLAGS...` starts `python -m pipeserve FLAGS` alone and drives it closed
loop over the seeded length mix (3 s warm-up, then --seconds measured), reporting req/s and the
latency percentiles overall and per length band (short ≤ 20 words, medium ≤ 60, long). Settings
run one after another, `--rounds` times in turn (A B A B …), and each figure is the median of
its rounds, so a slow minute of the machine does not decide a comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
from run_all import PIPESERVE, Running, machine  # noqa: E402

BANDS = ("short", "medium", "long")


def parse_settings(argv: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Split `[options] --setting NAME -- FLAGS... --setting ...` into options and settings."""
    options: list[str] = []
    settings: list[tuple[str, list[str]]] = []
    index = 0
    while index < len(argv):
        if argv[index] == "--setting":
            name = argv[index + 1]
            if index + 2 >= len(argv) or argv[index + 2] != "--":
                raise SystemExit(f"--setting {name!r} must be followed by -- and its flags")
            index += 3
            flags: list[str] = []
            while index < len(argv) and argv[index] != "--setting":
                flags.append(argv[index])
                index += 1
            settings.append((name, flags))
        else:
            options.append(argv[index])
            index += 1
    return options, settings


def measure(flags: list[str], clients: int, seconds: float) -> dict[str, Any]:
    server = Running(PIPESERVE + flags, "/ready")
    try:
        stats = asyncio.run(loadgen.closed_loop(server.port, clients, seconds, 3.0))
    finally:
        server.stop()
    row = {"req_s": stats.requests_per_s, "p50": stats.p50_ms, "p99": stats.p99_ms,
           "not_200": sum(v for k, v in stats.counts.items() if k != "200")}
    for band in BANDS:
        row[f"{band}_p99"] = stats.by_band_ms.get(band, {}).get("p99", float("nan"))
    return row


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Tuning runs",
        "",
        f"Measured {m['date']} at commit {m['commit']} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}: "
        f"C={result['clients']} closed loop over the seeded mix, {result['seconds']:g} s measured per round, "
        f"medians of {result['rounds']} alternating rounds. Reproduce:",
        "",
        "```sh",
        result["command"],
        "```",
        "",
        "| setting | flags | req/s | p50 ms | p99 ms | short p99 ms | medium p99 ms | long p99 ms | not 200 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["settings"].items():
        r = entry["median"]
        lines.append(f"| {name} | `{' '.join(entry['flags'])}` | {r['req_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                     f"{r['short_p99']:.0f} | {r['medium_p99']:.0f} | {r['long_p99']:.0f} | {r['not_200']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    options, settings = parse_settings(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(BENCH / "TUNING.md"))
    args = parser.parse_args(options)
    if not settings:
        parser.error("no --setting given")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in settings}
    for round_index in range(args.rounds):
        for name, flags in settings:
            row = measure(["--log-level", "warning", *flags], args.clients, args.seconds)
            rounds[name].append(row)
            print(f"round {round_index + 1} {name}: {json.dumps({k: round(v, 1) for k, v in row.items()})}",
                  flush=True)
    result = {
        "machine": machine(), "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
        "command": shlex.join(["python", "bench/tuning.py", *sys.argv[1:]]),
        "settings": {name: {"flags": flags, "rounds": rounds[name],
                            "median": {key: statistics.median(row[key] for row in rounds[name])
                                       for key in rounds[name][0]}}
                     for name, flags in settings},
    }
    Path(args.output).write_text(render(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
