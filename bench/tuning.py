"""Side-by-side settings of pipeserve at one concurrency: the measurements behind a default.

    .venv/bin/python bench/tuning.py --output bench/TUNING.md \\
        --setting "2x1" -- --workers 2 --threads 1 \\
        --setting "2x1, shortest first 250 ms" -- --workers 2 --threads 1 --shortest-first-ms 250

Each `--setting NAME -- FLAGS...` starts `python -m pipeserve FLAGS` alone and drives it closed
loop over the seeded length mix (3 s warm-up, then --seconds measured), reporting req/s and the
latency percentiles overall and per length band (short ≤ 20 words, medium ≤ 60, long). Settings
run one after another, `--rounds` times in turn (A B A B …), and each figure is the median of
its rounds, so a slow minute of the machine does not decide a comparison.

Two versions of the code side by side: `--setting NAME --source DIR -- FLAGS...` runs that
setting from another checkout's `src` (through PYTHONPATH), e.g. the commit before a change:

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/tuning.py --output /tmp/AB.md --rounds 5 \
        --setting before --source /tmp/before/src -- --setting after --

`--classifier DIR` first writes all-MiniLM-L6-v2's encoder with a new, untrained two-label
head to DIR (once), to measure text classification's cost (not its quality) with
`-- --model DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_all import PIPESERVE, closed_loop_alone, machine  # noqa: E402

BANDS = ("short", "medium", "long")


@dataclass(frozen=True)
class Setting:
    name: str
    flags: list[str]
    source: str | None = None  # another checkout's src directory, or None: this one's


def parse_settings(argv: list[str]) -> tuple[list[str], list[Setting]]:
    """Split `[options] --setting NAME [--source DIR] -- FLAGS... --setting ...`."""
    options: list[str] = []
    settings: list[Setting] = []
    index = 0
    while index < len(argv):
        if argv[index] == "--setting":
            name = argv[index + 1]
            index += 2
            source = None
            if index + 1 < len(argv) and argv[index] == "--source":
                source = str(Path(argv[index + 1]).resolve())
                index += 2
            if index >= len(argv) or argv[index] != "--":
                raise SystemExit(f"--setting {name!r} must be followed by -- and its flags")
            index += 1
            flags: list[str] = []
            while index < len(argv) and argv[index] != "--setting":
                flags.append(argv[index])
                index += 1
            settings.append(Setting(name, flags, source))
        else:
            options.append(argv[index])
            index += 1
    return options, settings


def measure(flags: list[str], clients: int, seconds: float, source: str | None = None) -> dict[str, Any]:
    # With a source, the server process imports pipeserve from there.
    env = None if source is None else {**os.environ, "PYTHONPATH": source}
    stats = closed_loop_alone(PIPESERVE + flags, "/ready", clients, seconds, env=env)
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
    lines += ["", "Each round (req/s, p99 ms):", ""]
    for name, entry in result["settings"].items():
        rounds = ", ".join(f"{row['req_s']:.1f}/{row['p99']:.0f}" for row in entry["rounds"])
        source = f" (from `{entry['source']}`)" if entry.get("source") else ""
        lines.append(f"- {name}{source}: {rounds}")
    return "\n".join(lines) + "\n"


def write_classifier(folder: Path) -> None:
    """all-MiniLM-L6-v2's encoder with a new two-label head: the cost of classification."""
    if (folder / "config.json").exists():
        return
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pipeserve.front.runtime import default_model_path

    path = default_model_path()
    BertForSequenceClassification.from_pretrained(path, num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)


def main() -> None:
    options, settings = parse_settings(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(BENCH / "TUNING.md"))
    parser.add_argument("--classifier", type=Path, help="write a two-label classifier here first")
    args = parser.parse_args(options)
    if not settings:
        parser.error("no --setting given")
    if args.classifier is not None:
        write_classifier(args.classifier)
    rounds: dict[str, list[dict[str, Any]]] = {setting.name: [] for setting in settings}
    for round_index in range(args.rounds):
        for setting in settings:
            row = measure(["--log-level", "warning", *setting.flags], args.clients, args.seconds, setting.source)
            rounds[setting.name].append(row)
            print(f"round {round_index + 1} {setting.name}: "
                  f"{json.dumps({k: round(v, 1) for k, v in row.items()})}", flush=True)
    result = {
        "machine": machine(), "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
        "command": shlex.join(["python", "bench/tuning.py", *sys.argv[1:]]),
        "settings": {setting.name: {"flags": setting.flags, "source": setting.source,
                                    "rounds": rounds[setting.name],
                                    "median": {key: statistics.median(row[key] for row in rounds[setting.name])
                                               for key in rounds[setting.name][0]}}
                     for setting in settings},
    }
    Path(args.output).write_text(render(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
