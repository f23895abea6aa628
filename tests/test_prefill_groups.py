"""Grouping a prefill's prompts by length: the grouping is the cheapest of all (checked against
every partition), and the engine prefills each group in its own pass, longest first, exactly."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeserve import ipc
from pipeserve.model import prefill_groups


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first], *partition]
        for index in range(len(partition)):
            yield [*partition[:index], [first, *partition[index]], *partition[index + 1:]]


def _cost(lengths: list[int], groups: list[list[int]], pass_tokens: int) -> int:
    return sum(pass_tokens + len(group) * max(lengths[index] for index in group) for group in groups)


@pytest.mark.parametrize("pass_tokens", [0, 8, 32, 1000])
def test_the_grouping_is_the_cheapest_partition_of_the_prompts(pass_tokens: int) -> None:
    rng = random.Random(pass_tokens)
    for _ in range(40):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 6))]
        groups = prefill_groups.by_length(lengths, pass_tokens)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths)))  # each once
        best = min(_cost(lengths, partition, pass_tokens) for partition in _partitions(list(range(len(lengths)))))
        assert _cost(lengths, groups, pass_tokens) == best, (lengths, groups)
    assert prefill_groups.by_length([]) == []
    assert prefill_groups.by_length([5, 90, 7, 88], pass_tokens=0) == [[0], [2], [3], [1]]
    assert prefill_groups.by_length([5, 90, 7, 88], pass_tokens=10**6) == [[0, 2, 3, 1]]


@pytest.mark.timeout(120)
def test_a_step_prefills_short_and_long_prompts_in_separate_passes_each_exactly(
        task_models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeserve.model.generation import Engine

    folder = task_models["text-generation"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    long_text = " ".join(["the good movie"] * 12)
    prompts = {1: "a", 2: long_text + " again", 3: "the cat", 4: long_text}
    lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts.values()]
    assert prefill_groups.by_length(lengths) == [[0, 2], [3, 1]]  # the shapes this test is about
    engine = Engine(model, tokenizer, max_running=8)
    engine.add(ipc.Generate(0, "hi", {"max_new_tokens": 1}))  # the first cache: it stacks
    while engine.active:
        engine.step()
    assert engine.static is False
    passes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda _module, _args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        for stream, prompt in prompts.items():
            engine.add(ipc.Generate(stream, prompt, {"max_new_tokens": 5, "ignore_eos": True}))
        first = engine.step()
        assert sorted(token.stream_id for token in first.tokens) == [1, 2, 3, 4] and not engine.waiting
        # Longest first: the shorter group's rows are then written into the cache's free rows.
        assert [rows for rows, _ in passes] == [2, 2] and passes[0][1] > passes[1][1]
        tokens = {stream: [token.id for token in first.tokens if token.stream_id == stream] for stream in prompts}
        while engine.active:
            for token in engine.step().tokens:
                tokens[token.stream_id].append(token.id)
    finally:
        hook.remove()
    for stream, prompt in prompts.items():
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            alone = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        assert tokens[stream] == [int(t) for t in alone[0, ids.shape[1]:]], stream
