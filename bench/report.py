"""Turn one run's results (bench/out/results.json) into bench/RESULTS.md.

    python bench/report.py bench/out/results.json > bench/RESULTS.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

BEST = "pipeserve 2 workers x 1 thread"
DEFAULTS = "pipeserve defaults (1 worker x 2 threads)"
TEXTBOOK = "textbook server"
LITSERVE = "LitServe 0.2.19 (batch 32, 2 ms)"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    servers = results["servers"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured {machine['date']} at commit {machine.get('commit', 'unknown')} on {machine['cores']} cores ({machine['cpu']}), Python "
        f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}; "
        "model: the embedded all-MiniLM-L6-v2 (mean-pooled, normalised sentence embeddings, the "
        "same work in every server). Workload: the seeded length mix of `bench/workload.py` "
        "(50 % 5–20 words, 35 % 21–60, 15 % 61–120). All figures below come from this one run of:",
        "",
        "```sh",
        f"{results['command']}",
        "```",
        "",
        f"Closed loop: {results['durations_s']['warmup']} s warm-up, then {results['durations_s']['closed']} s "
        "measured, one client process on the same machine. Latencies are of 200 answers; req/s counts "
        "200 answers only.",
        "",
        "| server | C=1 req/s | C=1 p50 ms | C=64 req/s | C=64 p50 ms | C=64 p90 ms | C=64 p99 ms | "
        "C=64 statuses | RSS front MiB | RSS total MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in servers.items():
        c1, c64 = result["c1"], result["c64"]
        lines.append(
            f"| {name} | {c1['requests_per_s']:.1f} | {_ms(c1['p50_ms'])} | {c64['requests_per_s']:.1f} | "
            f"{_ms(c64['p50_ms'])} | {_ms(c64['p90_ms'])} | {_ms(c64['p99_ms'])} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(c64['counts'].items()))} | "
            f"{result['rss_mb']['front']:.0f} | {result['rss_mb']['total']:.0f} |")
    inproc = results.get("inprocess", {})
    if inproc:
        lines += ["", "## In-process limits (no server)", "",
                  "The raw transformers pipeline, one torch thread per process, one process per core, "
                  "items/s summed over the processes:", "",
                  "| mode | items/s | RSS per process MiB |", "|---|---|---|"]
        for mode, value in inproc.items():
            lines.append(f"| {mode} | {value['items_per_s']:.1f} | {value['rss_mb']:.0f} |")
    overload = results.get("overload")
    if overload:
        lines += ["", "## Overload (open loop)", "",
                  f"{BEST} with `--max-queue {overload['max_queue']}` (about one second of work at its "
                  f"measured {overload['capacity']:.0f} req/s) and `--request-timeout "
                  f"{overload['request_timeout_s']:g}`, Poisson arrivals at {overload['level']:.0f} req/s "
                  f"(3x capacity) for {overload['duration_s']:g} s:", "",
                  f"- statuses: {', '.join(f'{k}: {v}' for k, v in sorted(overload['counts'].items()))}",
                  f"- 200: {overload['requests_per_s']:.1f} req/s, p50 {_ms(overload['p50_ms'])} ms, "
                  f"p99 {_ms(overload['p99_ms'])} ms, slowest {overload['max_ok_ms']:.0f} ms",
                  f"- 503: p50 {_ms(overload['refused_p50_ms'])} ms, p99 {_ms(overload['refused_p99_ms'])} ms"]
    lines += ["", "## Targets", ""] + _targets(results)
    return "\n".join(lines) + "\n"


def _targets(results: dict[str, Any]) -> list[str]:
    servers = results["servers"]
    if BEST not in servers:
        return ["(pipeserve's best setting was not measured in this run)"]
    best = servers[BEST]
    rows = ["| target | measured | verdict |", "|---|---|---|"]
    if LITSERVE in servers:
        lit = servers[LITSERVE]["c64"]
        ratio = best["c64"]["requests_per_s"] / lit["requests_per_s"]
        p99 = best["c64"]["p99_ms"] / lit["p99_ms"]
        rows.append(f"| ≥ 2.5x LitServe's req/s at C=64 | {ratio:.2f}x | {_verdict(ratio >= 2.5)} |")
        rows.append(f"| p99 ≤ 0.5x LitServe's at C=64 | {p99:.2f}x | {_verdict(p99 <= 0.5)} |")
    if TEXTBOOK in servers:
        textbook = servers[TEXTBOOK]
        ratio = best["c64"]["requests_per_s"] / textbook["c64"]["requests_per_s"]
        rows.append(f"| ≥ 2x the textbook server's req/s at C=64 | {ratio:.2f}x | {_verdict(ratio >= 2)} |")
        for name in (BEST, DEFAULTS):
            if name in servers:
                gap = servers[name]["c1"]["p50_ms"] - textbook["c1"]["p50_ms"]
                rows.append(f"| C=1 p50 within 2 ms of the textbook server's ({name}) | {gap:+.1f} ms | "
                            f"{_verdict(gap <= 2)} |")
    limit = results.get("inprocess", {}).get("sorted64-8")
    if limit:
        ratio = best["c64"]["requests_per_s"] / limit["items_per_s"]
        rows.append(f"| ≥ 0.85x the in-process limit (length-sorted, summed over cores) | {ratio:.2f}x | "
                    f"{_verdict(ratio >= 0.85)} |")
    overload = results.get("overload")
    if overload and overload.get("refused_p99_ms") is not None:
        rows.append(f"| open loop at 3x capacity: 503 p99 < 20 ms | {overload['refused_p99_ms']:.1f} ms | "
                    f"{_verdict(overload['refused_p99_ms'] < 20)} |")
        late = overload["max_ok_ms"] > overload["request_timeout_s"] * 1000
        rows.append(f"| no accepted request past its deadline ({overload['request_timeout_s']:g} s) | "
                    f"slowest 200: {overload['max_ok_ms']:.0f} ms | {_verdict(not late)} |")
    rows.append(f"| front process < 100 MB RSS | {best['rss_mb']['front']:.0f} MiB | "
                f"{_verdict(best['rss_mb']['front'] < 100)} |")
    if limit:
        budget = 2 * limit["rss_mb"] + 100
        rows.append(f"| total ≤ workers x in-process pipeline + 100 MB | {best['rss_mb']['total']:.0f} MiB "
                    f"vs {budget:.0f} MiB | {_verdict(best['rss_mb']['total'] <= budget)} |")
    return rows


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        sys.stdout.write(render_markdown(json.load(handle)))
