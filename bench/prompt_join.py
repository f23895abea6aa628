"""Does a long prompt joining hold up the streams already decoding? (issue #23, item 5)

    .venv/bin/python bench/prompt_join.py --source ../old/src --label before   # another checkout's src
    .venv/bin/python bench/prompt_join.py --label after                      # appends to prompt_join.jsonl

Results: bench/PROMPT_JOIN.md.

A small GPT-2 (4 layers, 256 wide, 1024 positions: a decoding step of a few milliseconds, so
the tokenizer's cost is not hidden behind the model's) with a byte-level BPE tokenizer trained
here. Four streams decode (256 new tokens each); once they run, one client sends a 200 KB prompt
(max_new_tokens 768, so ~256 prompt tokens are kept and prefilled). Per round: the running
streams' inter-token gaps before the join (p50, p99) and while the long prompt is handled (from
its request until its answer, plus 0.2 s: the largest gap and p99), and the long request's
latency. The same rounds in-process: tokenizing the whole 200 KB prompt against the engine's
tail-only tokenization (model/prompts.tail_ids), and whether both keep the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_all import Running  # noqa: E402

MODEL = BENCH / "out" / "gpt2-bpe-small"
STREAMS, ROUNDS, PROMPT_BYTES = 4, 5, 200 * 1024


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "shi", "po", "ven", "dor", "al", "is", "qu", "zy"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) + rng.choice(",.;: ")
                    for _ in range(count))


def build_model() -> Path:
    if (MODEL / "config.json").exists():
        return MODEL
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([words(20_000, seed) for seed in range(5)], trainers.BpeTrainer(
        vocab_size=8000, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    MODEL.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=256, n_layer=4, n_head=4, n_positions=1024,
                        eos_token_id=0, bos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).eval().save_pretrained(MODEL)
    return MODEL


def long_prompt() -> str:
    text = words(60_000, seed=99)
    return text[:PROMPT_BYTES]


def in_process() -> dict[str, Any]:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCH.parent / "src"))
    from pipeserve.model.prompts import tail_ids

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompt, room = long_prompt(), 1024 - 768
    full_ms, tail_ms = [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        full = list(tokenizer(prompt)["input_ids"])
        full_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        tail = tail_ids(tokenizer, prompt, room, add_special_tokens=True)
        tail_ms.append((time.perf_counter() - started) * 1000)
    return {"full_ms": statistics.median(full_ms), "tail_ms": statistics.median(tail_ms),
            "prompt_tokens": len(full), "same_kept_tokens": full[-room:] == tail[-room:]}


async def one_round(port: int, prompt: str) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]

    async def stream(session: aiohttp.ClientSession, index: int) -> None:
        document = {"inputs": "ka lo mi", "parameters": {"max_new_tokens": 256, "ignore_eos": True}}
        async with session.post(f"{base}/generate_stream", json=document) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    arrivals[index].append(time.perf_counter())

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks = [asyncio.ensure_future(stream(session, i)) for i in range(STREAMS)]
        while min(len(a) for a in arrivals) < 40:
            await asyncio.sleep(0.01)
        join_started = time.perf_counter()
        # Kept: the last 256 tokens (1024 positions - 768 new): tokenized, prefilled, first token.
        document = {"inputs": prompt, "parameters": {"max_new_tokens": 768, "ignore_eos": True}}
        async with session.post(f"{base}/generate_stream", json=document) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data:"):
                    break  # its first token: the join is over; leaving cancels the rest
        join_ended = time.perf_counter() + 0.2
        await asyncio.gather(*tasks)
    before, during = [], []
    for times in arrivals:
        for previous, current in itertools.pairwise(times):
            gap = (current - previous) * 1000
            if current < join_started:
                before.append(gap)
            elif previous <= join_ended and current >= join_started:
                during.append(gap)
    return {"before_p50_ms": _quantile(before, 0.5), "before_p99_ms": _quantile(before, 0.99),
            "during_max_ms": max(during or [0.0]), "during_p99_ms": _quantile(during, 0.99),
            "join_ms": (join_ended - 0.2 - join_started) * 1000}


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", help="another checkout's src/ to serve from (a before/after run)")
    parser.add_argument("--label", default="main")
    parser.add_argument("--out", default=str(BENCH / "prompt_join.jsonl"), help="appended: one line per run")
    args = parser.parse_args()
    build_model()
    env = dict(os.environ)
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    server = Running([sys.executable, "-m", "pipeserve", "--model", str(MODEL), "--log-level", "warning",
                      "--max-running-sequences", str(STREAMS + 1)], "/ready", env=env)
    try:
        prompt = long_prompt()  # made before the rounds: making it takes this client ~0.1 s
        rounds = [asyncio.run(one_round(server.port, prompt)) for _ in range(ROUNDS)]
    finally:
        server.stop()
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    result = {"label": args.label, "rounds": rounds, "median": summary, "in_process": in_process()}
    print(json.dumps(result, indent=1))
    with open(args.out, "a") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
