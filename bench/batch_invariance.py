"""Does a stream decoded beside others take the greedy tokens it takes alone? (issue #27 item 4)

    .venv/bin/python bench/llamacpp/model.py       # the tokenizer (once; see bench/LLAMACPP.md)
    .venv/bin/python bench/batch_invariance.py     # writes bench/BATCH_INVARIANCE.md (~5 minutes)

A small random Llama (4 layers, 128 wide, 4 heads over 2 key/value heads: ordinary weights, so
its logits hold near-ties), the bench tokenizer, 24 seeded prompts of different lengths, 40
greedy new tokens each through the generation engine in-process (`model/generation.py`): all 24
at once (left-padded rows in one batch), then each alone. Per setting, how many prompts took
other tokens together than alone, and at which step the first difference came. Settings:
bfloat16 with pipeserve's decoding attention (`model/attention.py`, every one-token step),
bfloat16 with SDPA everywhere, bfloat16 with the rule the decoding attention had before
(steps of 8 rows or more; SDPA for narrower ones, a lone stream's included), float32 (SDPA: the
decoding attention leaves float32 alone).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "llamacpp"))

import model as bench_model  # noqa: E402 - bench/llamacpp/model.py

PROMPTS = 24
NEW_TOKENS = 40
SETTINGS = (("bfloat16", "pipeserve decoding attention"), ("bfloat16", "SDPA"),
            ("bfloat16", "decoding attention from 8 rows, SDPA below (the rule before 09c3187)"), ("float32", "SDPA"))
OLD_RULE_ROWS = 8


def build(tokenizer: Any, dtype: str) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval().to(getattr(torch, dtype))


def generate(model: Any, tokenizer: Any, prompts: dict[int, str], attention: str) -> dict[int, list[int]]:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeserve import ipc
    from pipeserve.model import attention as decoding
    from pipeserve.model.generation import Engine

    engine = Engine(model, tokenizer, max_running=PROMPTS)  # switches SDPA to the decoding attention
    if attention == "SDPA":
        model.set_attn_implementation("sdpa")

    def old_rule(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        narrow = query.shape[0] < OLD_RULE_ROWS
        return (sdpa_attention_forward if narrow else decoding.attend)(module, query, *args, **kwargs)

    AttentionInterface.register(decoding.NAME, old_rule if attention.startswith("decoding attention from")
                                else decoding.attend)
    for stream, prompt in prompts.items():
        engine.add(ipc.Generate(stream, prompt, {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}))
    tokens: dict[int, list[int]] = {}
    while engine.active:
        for token in engine.step().tokens:
            tokens.setdefault(token.stream_id, []).append(token.id)
    return tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((step for step, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    if not bench_model.MODEL.exists():
        bench_model.build_model()
    tokenizer = AutoTokenizer.from_pretrained(bench_model.MODEL)
    # 1 to 6 sentences: prompts of different lengths, so the batch's rows are left-padded.
    prompts = {index: " ".join(bench_model.sentences(500 + index, 1 + index % 6)) for index in range(PROMPTS)}
    rows = []
    for dtype, attention in SETTINGS:
        model = build(tokenizer, dtype)
        together = generate(model, tokenizer, prompts, attention)
        steps = [first_difference(generate(model, tokenizer, {stream: prompt}, attention)[stream], together[stream])
                 for stream, prompt in prompts.items()]
        differing = sorted(step for step in steps if step is not None)
        rows.append(f"| {dtype} | {attention} | {len(differing)} of {PROMPTS} | "
                    f"{', '.join(map(str, differing)) or '-'} |")
        print(rows[-1], flush=True)
    bench_model.write_report("BATCH_INVARIANCE.md", "Streams decoded together against alone (greedy)",
                             "batch_invariance.py", __doc__, [
        "| dtype | attention | prompts whose tokens differ | first differing step of each |",
        "|---|---|---|---|",
        *rows,
    ])


if __name__ == "__main__":
    main()
