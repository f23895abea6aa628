"""A long prompt arriving beside running streams: what chunked prefill costs and buys.

    .venv/bin/python bench/llamacpp/model.py       # the model and tokenizer (once; bench/LLAMACPP.md)
    .venv/bin/python bench/chunked_prefill.py      # writes bench/CHUNKED_PREFILL.md (~3 minutes)

bench/LLAMACPP.md's random Llama of GPT-2-small cost in bfloat16 (packed weights, as served),
its position limit raised to 16384 (random weights: only cost is measured), through the
generation engine in-process (`model/generation.py`), 2 threads. Eight streams are running
(chat-length prompts, decoding); then one prompt of 8,000 tokens arrives. Per prefill budget
(`--max-batch-prefill-tokens`): the long prompt's time to its first token, the running streams'
longest wait between two tokens, the longest single step (what `--batch-timeout` watches), and
the steps it took, and the bytes the batch's key/value buffers hold once it has joined (every
row is as long as the longest, with room for --max-running-sequences rows). A budget above the
prompt's length is the one pass of before chunking.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "llamacpp"))

import model as bench_model  # noqa: E402 - bench/llamacpp/model.py

LONG_TOKENS = 8000
RUNNING = 8
BUDGETS = (1024, 2048, 4096, 16384)


def measure(model: Any, tokenizer: Any, budget: int, long_prompt: str, prompts: list[str]) -> dict[str, Any]:
    from pipeserve import ipc
    from pipeserve.model.generation import Engine

    engine = Engine(model, tokenizer, max_running=32, prefill_tokens=budget)
    for stream in range(RUNNING):
        engine.add(ipc.Generate(stream, prompts[stream], {"max_new_tokens": 500, "ignore_eos": True}))
    while engine.waiting:
        engine.step()
    engine.step()
    engine.add(ipc.Generate(RUNNING, long_prompt, {"max_new_tokens": 8, "ignore_eos": True}))
    started = last = time.perf_counter()
    first_token, longest_gap, longest_step, steps, after, buffers = None, 0.0, 0.0, 0, 0, 0
    while after < 2:  # until two steps after the long prompt's first token
        before = time.perf_counter()
        step = engine.step()
        now = time.perf_counter()
        steps += 1
        longest_step = max(longest_step, now - before)
        if any(token.stream_id < RUNNING for token in step.tokens):
            longest_gap, last = max(longest_gap, now - last), now
        if first_token is not None:
            after += 1
        elif any(token.stream_id == RUNNING for token in step.tokens):
            first_token = now - started
            buffers = sum(layer._keys.nbytes + layer._values.nbytes for layer in engine.cache.layers)
    return {"ttft": first_token, "gap": longest_gap, "step": longest_step, "steps": steps - 2, "buffers": buffers}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeserve.model import prepack

    torch.set_num_threads(2)
    if not bench_model.MODEL.exists():
        bench_model.build_model()
    tokenizer = AutoTokenizer.from_pretrained(bench_model.MODEL)
    model = AutoModelForCausalLM.from_pretrained(bench_model.MODEL, dtype=torch.bfloat16,
                                                 max_position_embeddings=16384).eval()
    prepack.swap(model, torch)
    prompts = bench_model.prompts(400)
    long_prompt = tokenizer.decode(tokenizer(" ".join(prompts))["input_ids"][:LONG_TOKENS])
    measure(model, tokenizer, BUDGETS[0], prompts[0], prompts)  # warm-up
    rows = []
    for budget in BUDGETS:
        result = measure(model, tokenizer, budget, long_prompt, prompts)
        label = f"{budget}" + (" (one pass)" if budget >= LONG_TOKENS else "")
        rows.append(f"| {label} | {result['ttft']:.1f} | {result['gap']:.1f} | {result['step']:.1f} | "
                    f"{result['steps']} | {result['buffers'] / 1e9:.1f} |")
        print(rows[-1], flush=True)
    bench_model.write_report("CHUNKED_PREFILL.md", "A long prompt beside running streams: chunked prefill",
                             "chunked_prefill.py", __doc__, [
        "| budget (tokens) | long prompt's first token s | running streams' longest gap s | longest step s | "
        "steps to its first token | key/value buffers after it joined GB |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


if __name__ == "__main__":
    main()
