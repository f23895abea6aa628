"""Streamed generation under concurrency: pipeserve, the textbook server, `transformers serve`.

    .venv/bin/pip install fastapi uvicorn     # what `transformers serve` needs (bench only)
    .venv/bin/python bench/generation.py      # writes bench/GENERATION.md (about 10 minutes)
    .venv/bin/python bench/generation.py --quick

A GPT-2-small-sized model (12 layers, 768 wide, 50257 tokens) with random weights and a
generated word-level tokenizer is built in bench/out/ (generation cost does not depend on the
weights). Each client sends streamed OpenAI /v1/completions requests, one after another, greedy,
with 64-256 new tokens (seeded), and records when each token arrives. Figures per server and
concurrency: tokens/s over the measured period, time to first token p50/p99, inter-token p99, and
streams cut short by an error event (a deadline, a crash).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_all import Running, machine  # noqa: E402

PY = sys.executable
MODEL = BENCH / "out" / "gpt2-small-random"
LEVELS = (1, 4, 16, 32)


def build_model() -> Path:
    if (MODEL / "config.json").exists():
        return MODEL
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"w{i}": i + 3 for i in range(50257 - 3)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    MODEL.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL)
    config = GPT2Config(vocab_size=len(vocab), eos_token_id=2, bos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(config).eval().save_pretrained(MODEL)
    return MODEL


def record_arrival(record: dict[str, list[float]], now: float, last: float | None, started: float,
                   measured: bool) -> None:
    """One token's arrival, within the measured period: the time, and its TTFT or inter-token gap."""
    if not measured:
        return
    record["tokens"].append(now)
    if last is None:
        record["ttft"].append(now - started)
    else:
        record["gaps"].append(now - last)


def servers() -> dict[str, tuple[list[str], str, dict[str, Any]]]:
    model = str(MODEL)
    pipeserve = [PY, "-m", "pipeserve", "--model", model, "--log-level", "warning"]
    return {
        "pipeserve defaults (continuous batching)": (pipeserve, "/ready", {"ignore_eos": True}),
        "pipeserve --dtype float32 (the peers' precision)": (
            [*pipeserve, "--dtype", "float32"], "/ready", {"ignore_eos": True}),
        "textbook (one request at a time)": (
            [PY, str(BENCH / "baselines/textbook_generate.py"), model], "/health", {}),
        "transformers serve --continuous-batching": (
            [str(Path(PY).parent / "transformers"), "serve", model, "--continuous-batching", "--device", "cpu",
             "--host", "127.0.0.1", "--log-level", "error"], "/health", {}),
    }


async def client(session: aiohttp.ClientSession, url: str, extra: dict[str, Any], rng: random.Random,
                 stop_at: float, measure_from: float, record: dict[str, list[float]]) -> None:
    while time.monotonic() < stop_at:
        prompt = " ".join(f"w{rng.randrange(50000)}" for _ in range(rng.randrange(8, 32)))
        body = {"model": str(MODEL), "prompt": prompt, "max_tokens": rng.randrange(64, 257), "temperature": 0,
                "stream": True, **extra}
        started = time.monotonic()
        last = None
        async with session.post(url, json=body) as response:
            async for line in response.content:
                if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:  # a stream cut short (a deadline, a crash): counted, not hidden
                    if measure_from <= time.monotonic() < stop_at:
                        record["errors"].append(time.monotonic())
                    break
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.monotonic()
                record_arrival(record, now, last, started, measure_from <= now < stop_at)
                last = now


async def level(port: int, extra: dict[str, Any], clients: int, warmup: float, seconds: float) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    record: dict[str, list[float]] = {"tokens": [], "ttft": [], "gaps": [], "errors": []}
    measure_from = time.monotonic() + warmup
    stop_at = measure_from + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.create_task(client(session, url, extra, random.Random(index), stop_at, measure_from,
                                            record)) for index in range(clients)]
        await asyncio.wait(tasks, timeout=stop_at - time.monotonic() + 1)
        for task in tasks:  # what is still queued or running counts no more: stop it
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000 if values else float("nan")

    return {"tokens_per_s": len(record["tokens"]) / seconds, "ttft_p50_ms": pct(record["ttft"], 0.5),
            "ttft_p99_ms": pct(record["ttft"], 0.99), "inter_token_p99_ms": pct(record["gaps"], 0.99),
            "streams_started": len(record["ttft"]), "stream_errors": len(record["errors"])}


def _pipeserve_setting(port: int) -> str:
    """The workers, threads and dtype a running pipeserve chose, from /info."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as response:
        info = json.load(response)
    workers = info["workers"]
    return f"{len(workers)} worker(s) x {workers[0]['threads']} thread(s), {info['dtype']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--servers", default="", help="only the servers whose name contains one of these (comma-separated)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients, comma-separated")
    parser.add_argument("--output", default=str(BENCH / "GENERATION.md"))
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    wanted = [part for part in args.servers.split(",") if part]
    warmup, seconds = (3.0, 8.0) if args.quick else (10.0, 30.0)
    build_model()
    results: dict[str, dict[int, dict[str, float]]] = {}
    for server_name, (command, ready, extra) in servers().items():
        if wanted and not any(part in server_name for part in wanted):
            continue
        print(f"-- {server_name}", flush=True)
        server = Running(command, ready)
        try:
            name = f"{server_name}: {_pipeserve_setting(server.port)}" if "pipeserve" in server_name else server_name
            results[name] = {}
            for clients in levels:
                results[name][clients] = asyncio.run(level(server.port, extra, clients, warmup, seconds))
                print(f"   C={clients}: {results[name][clients]}", flush=True)
        finally:
            server.stop()
    facts = machine()
    lines = ["# Streamed generation", "",
             f"Measured {facts['date']} at commit {facts['commit']} on {facts['cores']} cores ({facts['cpu']}), "
             f"torch {facts['torch']}, transformers {facts['transformers']}, with `python bench/generation.py"
             f"{''.join(' ' + a for a in sys.argv[1:])}`: a GPT-2-small-sized model with random weights, streamed "
             f"/v1/completions, greedy, 64-256 new tokens; {warmup:g} s warm-up, then {seconds:g} s measured per level.",
             "", "| server | clients | tokens/s | TTFT p50 ms | TTFT p99 ms | inter-token p99 ms | streams cut |",
             "|---|---|---|---|---|---|---|"]
    for name, by_level in results.items():
        for clients, row in by_level.items():
            lines.append(f"| {name} | {clients} | {row['tokens_per_s']:.1f} | {row['ttft_p50_ms']:.0f} | "
                         f"{row['ttft_p99_ms']:.0f} | {row['inter_token_p99_ms']:.0f} | "
                         f"{row.get('stream_errors', 0)} |")
    Path(args.output).write_text("\n".join(lines) + "\n")
    (BENCH / "out").mkdir(exist_ok=True)
    (BENCH / "out" / "generation.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
