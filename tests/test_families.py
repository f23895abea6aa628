"""The continuous-batching engine on the model families people serve (issue #27 item 5), each a
tiny random config: sequences that join a running batch midway, and leave it, generate exactly
what each prompt gives alone: the model's own greedy choice, recomputed over the whole sequence
without a cache at every step (the definition, not an implementation of it: transformers 5's
generate() on the sliding-window Mistral below departs from it once a sequence is longer than
the window). Mistral with a sliding window, LFM2 (convolution states beside attention) and Mamba
(state-space layers only) cannot share their caches row by row: the engine falls back to static
batches (a newcomer waits for the running ones; one that ends early leaves its rows), and their
answers must be exact too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeserve import ipc

# (family, its config class, the config's own arguments beyond the shared ones)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "mistral-sliding-window": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 6}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 1, "head_dim": 8}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4, "original_max_position_embeddings": 128}),
    "gpt-neox": ("GPTNeoXConfig", {"rotary_pct": 0.5}),
    "opt": ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    # Recurrent state: LFM2's short convolutions beside attention; Mamba's state-space layers alone.
    "lfm2-hybrid": ("Lfm2Config", {"num_key_value_heads": 2, "layer_types": ["conv", "full_attention"]}),
    "mamba": ("MambaConfig", {"state_size": 8}),
}
# Caches that cannot be cut into rows: the static-batch fallback.
STATIC = {"mistral-sliding-window", "lfm2-hybrid", "mamba"}
GREEDY = {"max_new_tokens": 6, "ignore_eos": True}


def _model(family: str, tokenizer: Any) -> Any:
    import torch
    import transformers

    name, own = FAMILIES[family]
    config = getattr(transformers, name)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # Wide weights: a random model's logits are otherwise near-ties, and a last-bit difference
        # between a batch and a lone prompt could flip a greedy choice.
        initializer_range=0.5, **own)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _alone(model: Any, tokenizer: Any, prompt: str, new: int) -> list[int]:
    """Greedy, the whole sequence through the model at every step, no cache."""
    import torch

    sequence = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(new):
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits
            generated.append(int(logits[0, -1].argmax()))
            sequence = torch.cat([sequence, torch.tensor([[generated[-1]]])], dim=1)
    return generated


def _run(engine: Any, steps: int | None = None) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for _ in range(steps if steps is not None else 10_000):
        if steps is None and not engine.active:
            break
        for token in engine.step().tokens:
            tokens.setdefault(token.stream_id, []).append(token.id)
    return tokens


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_streams_joining_and_leaving_generate_what_each_prompt_gives_alone(
        family: str, task_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    model = _model(family, tokenizer)
    engine = Engine(model, tokenizer, max_running=8)
    prompts = {1: "the good movie", 2: "a", 3: "hello world this is a much longer prompt than the others"}
    engine.add(ipc.Generate(1, prompts[1], GREEDY))
    first = _run(engine, steps=3)  # 1 is three tokens in when 2 and 3 arrive
    shared = engine.joinable  # whether its cache takes rows that join
    engine.add(ipc.Generate(2, prompts[2], {**GREEDY, "max_new_tokens": 3}))  # leaves before the others
    engine.add(ipc.Generate(3, prompts[3], {**GREEDY, "max_new_tokens": 9}))
    rest = _run(engine)
    tokens = {1: first.get(1, []) + rest.get(1, []), 2: rest[2], 3: rest[3]}
    assert [len(tokens[stream]) for stream in (1, 2, 3)] == [6, 3, 9]
    for stream, prompt in prompts.items():
        assert tokens[stream] == _alone(model, tokenizer, prompt, len(tokens[stream])), (family, stream)
    # Row-by-row sharing where the cache allows it; the static-batch fallback where it does not.
    assert shared == (family not in STATIC), family


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompts_reusing_ended_sequences_prefixes_generate_what_they_give_alone(
        family: str, task_models: dict[str, Path]) -> None:
    """Issue #27 item 3: a conversation's next turn prefills only what follows its earlier turns'
    kept keys and values (prompt and reply), and its tokens are the whole sequence's own. Two
    conversations' second turns arrive together (prefixes of different lengths, prefilled in one
    pass beside a running stream); a third turn then reuses what the second turn's row kept."""
    from transformers import AutoTokenizer

    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    model = _model(family, tokenizer)
    engine = Engine(model, tokenizer, max_running=8, prefix_cache_bytes=64 << 20)
    systems = {1: " ".join(["the good movie was a long one and this is what we saw"] * 4),
               2: " ".join(["hello world this is a much longer prompt"] * 5)}
    prompts = dict(systems)
    for stream in (1, 2):
        prompts[stream] += tokenizer.decode(_ended(engine, {stream: prompts[stream]}, 8)[stream][0]) + " hello world"
    engine.add(ipc.Generate(9, "a", {**GREEDY, "max_new_tokens": 12}))  # running beside the second turns
    _run(engine, steps=2)
    second = _ended(engine, {11: prompts[1], 12: prompts[2]}, 6)
    third_prompt = prompts[1] + tokenizer.decode(second[11][0]) + " the good"
    third = _ended(engine, {13: third_prompt}, 6)
    turns = {11: (prompts[1], second[11]), 12: (prompts[2], second[12]), 13: (third_prompt, third[13])}
    for stream, (prompt, (tokens, end)) in turns.items():
        assert tokens == _alone(model, tokenizer, prompt, 6), (family, stream)
        if family in STATIC:  # its cache cannot be cut into rows to keep
            assert end.cached_tokens == 0
        else:  # the earlier turn was kept whole, up to its reply's last token (never fed back)
            assert end.cached_tokens >= len(tokenizer(systems[1 if stream != 12 else 2])["input_ids"]), family
    if family not in STATIC:
        # More than the first turn's entry gives: the second turn's row (a gap inside it) was kept.
        assert turns[13][1][1].cached_tokens > turns[11][1][1].cached_tokens


def _ended(engine: Any, prompts: dict[int, str], new: int) -> dict[int, tuple[list[int], ipc.StreamEnd]]:
    """Add these prompts together; step until each has ended: its tokens and its end."""
    for stream, prompt in prompts.items():
        engine.add(ipc.Generate(stream, prompt, {**GREEDY, "max_new_tokens": new}))
    tokens: dict[int, list[int]] = {stream: [] for stream in prompts}
    ended: dict[int, ipc.StreamEnd] = {}
    while len(ended) < len(prompts):
        step = engine.step()
        for token in step.tokens:
            if token.stream_id in tokens:
                tokens[token.stream_id].append(token.id)
        ended.update({end.stream_id: end for end in step.ended if end.stream_id in tokens})
    return {stream: (tokens[stream], ended[stream]) for stream in prompts}


@pytest.mark.timeout(120)
def test_rests_longer_than_the_caches_growth_room_prefill_onto_their_prefixes(task_models: dict[str, Path]) -> None:
    """Two prompts reusing prefixes at once, each with more new tokens than the cache adds room
    for at a time (kv_cache.GROWTH): the cache makes the room, and the tokens are exact."""
    from transformers import AutoTokenizer

    from pipeserve.model import kv_cache
    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    model = _model("llama", tokenizer)
    engine = Engine(model, tokenizer, max_running=8, prefix_cache_bytes=64 << 20)
    firsts = {1: " ".join(["the good movie was a long one"] * 5), 2: " ".join(["hello world this is"] * 9)}
    rest = " ".join(["and then a much longer prompt than the others"] * 7)
    prompts = {stream: prompt + tokenizer.decode(_ended(engine, {stream: prompt}, 4)[stream][0]) + rest
               for stream, prompt in firsts.items()}
    second = _ended(engine, {11: prompts[1], 12: prompts[2]}, 4)
    for stream, (tokens, end) in second.items():
        assert end.prompt_tokens - end.cached_tokens > kv_cache.GROWTH
        assert end.cached_tokens > 0
        assert tokens == _alone(model, tokenizer, prompts[stream - 10], 4)


def test_a_model_without_a_position_table_takes_the_tokenizers_saved_limit(task_models: dict[str, Path]) -> None:
    """Mamba's config has no positions: the engine's limit (where an over-long prompt keeps its
    end) is the tokenizer's saved model_max_length, else 2048; a Llama's is its own table's."""
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    assert Engine(_model("llama", tokenizer), tokenizer, max_running=2).max_positions == 128
    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                         state_size=4)).eval()
    tokenizer.model_max_length = int(1e30)  # what a tokenizer saved without a limit reports
    assert Engine(mamba, tokenizer, max_running=2).max_positions == 2048
    tokenizer.model_max_length = 300
    engine = Engine(mamba, tokenizer, max_running=2)
    assert engine.max_positions == 300
    ended = engine.add(ipc.Generate(1, "x", {"max_new_tokens": 300}))
    assert ended is not None and ended.error is not None and "300 positions" in ended.error.message
