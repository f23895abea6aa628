"""The continuous-batching engine in-process (the model process's side), on the tiny GPT-2:
sequences that join, leave and are cancelled mid-flight generate exactly what they would alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeserve import ipc


@pytest.fixture(scope="module")
def gpt2(task_models: dict[str, Path]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = task_models["text-generation"]
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _engine(gpt2: tuple[Any, Any], max_running: int = 8, **settings: int) -> Any:
    from pipeserve.model.generation import Engine

    return Engine(*gpt2, max_running=max_running, **settings)


def _alone(gpt2: tuple[Any, Any], prompt: str, new: int) -> list[int]:
    """What transformers' own generate() gives for this prompt alone, greedily."""
    import torch

    model, tokenizer = gpt2
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]


def _run(engine: Any, until_idle: bool = True, steps: int = 10_000) -> tuple[dict[int, list[int]], dict[int, Any]]:
    tokens: dict[int, list[int]] = {}
    ended: dict[int, Any] = {}
    for _ in range(steps):
        if until_idle and not engine.active:
            break
        step = engine.step()
        for token in step.tokens:
            tokens.setdefault(token.stream_id, []).append(token.id)
        for end in step.ended:
            ended[end.stream_id] = end
    return tokens, ended


GREEDY = {"max_new_tokens": 6, "ignore_eos": True}


def test_sequences_that_join_midway_generate_what_they_would_alone(gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2)
    prompts = {1: "the good movie", 2: "a", 3: "hello world this is a much longer prompt than the others"}
    engine.add(ipc.Generate(1, prompts[1], GREEDY))
    first, _ = _run(engine, until_idle=False, steps=3)  # 1 is three tokens in when 2 and 3 join
    engine.add(ipc.Generate(2, prompts[2], GREEDY))
    engine.add(ipc.Generate(3, prompts[3], {**GREEDY, "max_new_tokens": 9}))
    rest, ended = _run(engine)
    tokens = {1: first[1] + rest[1], 2: rest[2], 3: rest[3]}
    for stream_id, prompt in prompts.items():
        assert tokens[stream_id] == _alone(gpt2, prompt, len(tokens[stream_id])), stream_id
    assert {s: (e.finish_reason, e.generated_tokens) for s, e in ended.items()} == {
        1: ("length", 6), 2: ("length", 6), 3: ("length", 9)}
    assert engine.cache is None and not engine.running  # everything left


def test_a_cancelled_sequence_leaves_and_the_others_continue(gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2)
    for stream_id in (1, 2, 3):
        engine.add(ipc.Generate(stream_id, f"the {stream_id} dog", {**GREEDY, "max_new_tokens": 8}))
    _run(engine, until_idle=False, steps=2)
    engine.cancel(2)
    tokens, ended = _run(engine)
    assert ended[2].finish_reason == "cancelled" and ended[2].generated_tokens == 2
    assert ended[1].finish_reason == ended[3].finish_reason == "length"
    assert len(tokens[1]) == 6 and 2 not in tokens  # two before the cancel, six after


def test_at_most_max_running_sequences_share_a_step(gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2, max_running=2)
    for stream_id in range(5):
        engine.add(ipc.Generate(stream_id, "the cat", {**GREEDY, "max_new_tokens": 3}))
    widths, ended = [], []
    while engine.active:
        step = engine.step()
        widths.append(len(engine.running) + len(step.ended))
        ended += [end.stream_id for end in step.ended]
    assert max(widths) == 2 and sorted(ended) == [0, 1, 2, 3, 4]


def test_a_step_prefills_at_most_its_token_budget_a_longer_prompt_in_chunks(
        gpt2: tuple[Any, Any]) -> None:
    """Waiting prompts are prefilled in order while rows x the longest stays within the
    engine's prefill_tokens (--max-batch-prefill-tokens); one longer than the budget is computed
    in chunks of it (no pass computes more), those behind it that fit going between its chunks;
    the tokens are each prompt's own."""
    model, tokenizer = gpt2
    prompts = {1: "the good movie", 2: "a cat sat", 3: "hello world this is a much longer prompt than the others",
               4: "the cat"}
    lengths = {stream: len(tokenizer(prompt)["input_ids"]) for stream, prompt in prompts.items()}
    budget = 2 * max(lengths[1], lengths[2])
    assert lengths[3] > budget and 2 * lengths[4] <= budget  # 3 over the budget; then 4
    engine = _engine(gpt2, prefill_tokens=budget)
    for stream, prompt in prompts.items():
        engine.add(ipc.Generate(stream, prompt, GREEDY))
    passes: list[tuple[int, ...]] = []  # every prefill pass's [rows, tokens]
    hook = model.register_forward_pre_hook(
        lambda _module, _args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    prefilled = []  # the streams whose first token each step gave
    tokens: dict[int, list[int]] = {}
    try:
        while engine.active:
            step = engine.step()
            prefilled.append(sorted({token.stream_id for token in step.tokens if token.stream_id not in tokens}))
            for token in step.tokens:
                tokens.setdefault(token.stream_id, []).append(token.id)
    finally:
        hook.remove()
    firsts = [streams for streams in prefilled if streams]
    assert firsts[:3] == [[1, 2], [4], [3]]  # 4 fits between 3's chunks; 3 after its last
    assert prefilled[1] == []  # 3's first chunk: no token yet
    assert all(rows * width <= budget for rows, width in passes if width > 1)
    for stream, prompt in prompts.items():
        assert tokens[stream] == _alone(gpt2, prompt, GREEDY["max_new_tokens"]), stream


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_with_decoding_steps_between(
        gpt2: tuple[Any, Any]) -> None:
    """A prompt whose rest is longer than the engine's prefill_tokens (--max-batch-prefill-tokens)
    is computed that many tokens a step, on its own keys and values so far, the running streams
    decoding a token between two chunks and before its last rest (no step runs past the budget:
    the watchdog's --batch-timeout bounds a step); each stream's tokens are its own, and chunks
    do not count as reused prompt tokens."""
    _, tokenizer = gpt2
    long_prompt = " ".join(["the good movie was long"] * 5)
    assert 24 < len(tokenizer(long_prompt)["input_ids"]) <= 32  # three chunks, then a rest
    engine = _engine(gpt2, prefill_tokens=8)
    engine.add(ipc.Generate(1, "the cat", {**GREEDY, "max_new_tokens": 12}))
    tokens: dict[int, list[int]] = {}
    ended: dict[int, Any] = {}
    steps: list[list[int]] = []
    for count in range(40):
        if count == 1:
            engine.add(ipc.Generate(2, long_prompt, GREEDY))
        if not engine.active:
            break
        step = engine.step()
        steps.append(sorted(token.stream_id for token in step.tokens))
        for token in step.tokens:
            tokens.setdefault(token.stream_id, []).append(token.id)
        ended.update({end.stream_id: end for end in step.ended})
    # 1's prefill; then three chunks of 2's prompt (no token), each followed by 1's decoding
    # step; then 2's last rest joins (its first token), and both decode.
    assert steps[:9] == [[1], [], [1], [], [1], [], [1], [2], [1, 2]]
    assert tokens[1] == _alone(gpt2, "the cat", 12) and tokens[2] == _alone(gpt2, long_prompt, GREEDY["max_new_tokens"])
    assert ended[2].cached_tokens == 0 and ended[2].finish_reason == "length"
    assert not engine.running and not engine.waiting


def test_prompts_behind_a_chunked_one_are_prefilled_between_its_chunks(gpt2: tuple[Any, Any]) -> None:
    """Between two chunks, the prompts behind the long one that fit are prefilled and every
    running stream (they too) decodes a token: they do not wait for all its chunks."""
    engine = _engine(gpt2, prefill_tokens=8)
    engine.add(ipc.Generate(1, "the cat", {**GREEDY, "max_new_tokens": 12}))
    tokens: dict[int, list[int]] = {}
    steps: list[list[int]] = []

    def step() -> None:
        result = engine.step()
        steps.append(sorted(token.stream_id for token in result.tokens))
        for token in result.tokens:
            tokens.setdefault(token.stream_id, []).append(token.id)

    step()
    long_prompt = " ".join(["the good movie was long"] * 5)
    engine.add(ipc.Generate(2, long_prompt, GREEDY))
    engine.add(ipc.Generate(3, "a cat sat", GREEDY))
    step()  # the first chunk of 2, alone
    step()  # 3's prefill (its first token), then 1 and 3 decode
    assert steps == [[1], [], [1, 3, 3]]
    while engine.active:
        step()
    assert tokens[1] == _alone(gpt2, "the cat", 12)
    assert tokens[2] == _alone(gpt2, long_prompt, GREEDY["max_new_tokens"])
    assert tokens[3] == _alone(gpt2, "a cat sat", GREEDY["max_new_tokens"])


def test_a_first_prompt_too_long_for_one_pass_is_chunked_once_a_probe_shows_caches_stack(
        gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2, prefill_tokens=8)
    long_prompt = " ".join(["the good movie was long"] * 5)
    engine.add(ipc.Generate(1, long_prompt, GREEDY))
    steps = [engine.step()]
    assert steps[0].tokens == [] and engine.static is False  # a chunk, no token yet
    while not steps[-1].tokens:
        steps.append(engine.step())
    chunks = (len(gpt2[1](long_prompt)["input_ids"]) - 1) // 8  # then the last rest, with a token
    assert len(steps) == chunks + 1  # nothing else to run: no idle step between chunks
    tokens, _ = _run(engine)
    assert [token.id for token in steps[-1].tokens] + tokens[1] == _alone(gpt2, long_prompt, GREEDY["max_new_tokens"])


def test_a_long_prompt_that_starts_with_a_kept_prefix_is_chunked_after_it(
        gpt2: tuple[Any, Any]) -> None:
    """The first chunk starts where the kept prefix ends; only the prefix counts as reused."""
    engine = _engine(gpt2, prefill_tokens=8, prefix_cache_bytes=64 << 20)
    system = " ".join(["the good movie was long and"] * 7)
    assert _run_one(engine, 1, system)[1].cached_tokens == 0
    longer = system + " " + " ".join(["a cat sat on the mat"] * 4)
    tokens, end = _run_one(engine, 2, longer)
    assert end.cached_tokens >= 32 and end.finish_reason == "length"
    assert len(gpt2[1](longer)["input_ids"]) - end.cached_tokens > 8  # so it was chunked after the prefix
    assert tokens == _alone(gpt2, longer, GREEDY["max_new_tokens"])


def _run_one(engine: Any, stream: int, prompt: str) -> tuple[list[int], Any]:
    engine.add(ipc.Generate(stream, prompt, GREEDY))
    tokens, ended = _run(engine)
    return tokens[stream], ended[stream]


def test_a_prompt_cancelled_between_its_chunks_ends_and_the_others_go_on(
        gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2, prefill_tokens=8)
    engine.add(ipc.Generate(1, "the cat", GREEDY))
    first = engine.step()
    engine.add(ipc.Generate(2, " ".join(["the good movie was long"] * 5), GREEDY))
    assert engine.step().tokens == [] and engine.waiting[0].computed is not None  # a chunk of 2
    engine.cancel(2)
    tokens, ended = _run(engine)
    assert ended[2].finish_reason == "cancelled" and ended[2].generated_tokens == 0
    assert [token.id for token in first.tokens] + tokens[1] == _alone(gpt2, "the cat", GREEDY["max_new_tokens"])


def test_a_row_whose_scores_overflow_ends_alone_and_the_others_go_on(gpt2: tuple[Any, Any]) -> None:
    """Non-finite scores (a float16 overflow) in one row: that stream ends with an error (sampling
    it would raise for the whole step), the other keeps generating its own tokens."""
    import torch

    model, _ = gpt2
    engine = _engine(gpt2)
    engine.add(ipc.Generate(1, "the good movie", {"max_new_tokens": 6, "do_sample": True, "seed": 3}))
    engine.add(ipc.Generate(2, "a cat sat", GREEDY))

    def overflow_first_of_two(module: Any, inputs: Any, output: Any) -> Any:
        return output.index_fill(0, torch.tensor([0]), float("nan")) if output.shape[0] == 2 else output

    hook = model.lm_head.register_forward_hook(overflow_first_of_two)
    try:
        tokens, ended = _run(engine)
    finally:
        hook.remove()
    assert ended[1].finish_reason == "error" and ended[1].error.kind == ipc.ErrorKind.INTERNAL
    assert "not finite" in ended[1].error.message and 1 not in tokens
    assert ended[2].finish_reason == "length" and tokens[2] == _alone(gpt2, "a cat sat", 6)
    assert engine.cache is None and not engine.running


def test_seeded_sampling_repeats_and_stop_sequences_end_early(gpt2: tuple[Any, Any]) -> None:
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 20,
               "seed": 7, "ignore_eos": True}
    runs = []
    for _ in range(2):
        engine = _engine(gpt2)
        engine.add(ipc.Generate(1, "the good movie", sampled))
        engine.add(ipc.Generate(2, "a bad film", {**sampled, "seed": 8}))
        tokens, ended = _run(engine)
        runs.append(tokens)
        assert ended[1].seed == 7
    assert runs[0] == runs[1] and runs[0][1] != runs[0][2]
    tokenizer = gpt2[1]
    first_word = tokenizer.decode(runs[0][1][:1], skip_special_tokens=True).strip()
    engine = _engine(gpt2)
    engine.add(ipc.Generate(1, "the good movie", {**sampled, "stop": [first_word]}))
    tokens, ended = _run(engine)
    assert ended[1].finish_reason == "stop_sequence" and len(tokens[1]) == 1


def test_a_chat_without_a_template_ends_with_a_bad_input_error(gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2)
    gpt2[1].chat_template = None
    end = engine.add(ipc.Generate(1, None, GREEDY, messages=[{"role": "user", "content": "hi"}]))
    assert end is not None and end.error is not None and end.error.kind is ipc.ErrorKind.BAD_INPUT
    assert "chat template" in end.error.message and not engine.active


@pytest.fixture(scope="module")
def sliding(gpt2: tuple[Any, Any]) -> tuple[Any, Any]:
    """A tiny Mistral with a 4-token sliding window: its cache layers cannot be stacked."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = gpt2[1]
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           sliding_window=4, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return MistralForCausalLM(config).eval(), tokenizer


def test_a_cache_that_cannot_be_stacked_falls_back_to_static_batches_that_stream(
        sliding: tuple[Any, Any]) -> None:
    # Below any prompt: once the cache showed it cannot be stacked, a static batch is prefilled
    # whole regardless (a prompt left out would wait for the whole batch, not a step).
    engine = _engine(sliding, prefill_tokens=1)
    prompts = {1: "the good movie", 2: "a", 3: "hello world this is a much longer prompt"}
    engine.add(ipc.Generate(1, prompts[1], GREEDY))
    first = engine.step()
    assert not engine.joinable  # the sliding-window layers were recognised
    engine.add(ipc.Generate(2, prompts[2], GREEDY))
    engine.add(ipc.Generate(3, prompts[3], {**GREEDY, "max_new_tokens": 9}))
    steps: list[set[int]] = []
    tokens: dict[int, list[int]] = {1: [token.id for token in first.tokens]}
    ended: dict[int, Any] = {}
    while engine.active:
        step = engine.step()
        steps.append({token.stream_id for token in step.tokens})
        for token in step.tokens:
            tokens.setdefault(token.stream_id, []).append(token.id)
        ended.update({end.stream_id: end for end in step.ended})
    # 1 finishes its five remaining tokens alone; then 2 and 3 run as one batch, streamed per row.
    assert steps == [{1}] * 5 + [{2, 3}] * 6 + [{3}] * 3
    assert {s: (e.finish_reason, e.generated_tokens) for s, e in ended.items()} == {
        1: ("length", 6), 2: ("length", 6), 3: ("length", 9)}
    for stream_id, prompt in prompts.items():
        assert tokens[stream_id] == _alone(sliding, prompt, len(tokens[stream_id])), stream_id
    assert engine.cache is None and not engine.running


def test_the_first_wave_of_a_model_whose_cache_cannot_be_stacked_is_one_pass(sliding: tuple[Any, Any]) -> None:
    """Before the first cache shows whether rows can be stacked, a step's prompts are not split
    into passes by length: a group left out would wait for the whole static batch."""
    engine = _engine(sliding)
    prompts = {1: " ".join(["the good movie"] * 8), 2: "a", 3: "the cat"}
    for stream, prompt in prompts.items():
        engine.add(ipc.Generate(stream, prompt, GREEDY))
    first = engine.step()
    assert sorted(token.stream_id for token in first.tokens) == [1, 2, 3] and not engine.waiting
    assert engine.static is True
    tokens, _ = _run(engine)
    for stream, prompt in prompts.items():
        assert [token.id for token in first.tokens if token.stream_id == stream] + tokens[stream] == _alone(
            sliding, prompt, GREEDY["max_new_tokens"]), stream


def test_a_first_prompt_too_long_for_one_pass_goes_whole_where_caches_cannot_be_stacked(
        sliding: tuple[Any, Any]) -> None:
    engine = _engine(sliding, prefill_tokens=4)
    prompt = "hello world this is a much longer prompt"
    engine.add(ipc.Generate(1, prompt, GREEDY))
    first = engine.step()
    assert [token.stream_id for token in first.tokens] == [1] and engine.static is True
    tokens, _ = _run(engine)
    assert [token.id for token in first.tokens] + tokens[1] == _alone(sliding, prompt, GREEDY["max_new_tokens"])


def test_rows_leave_in_place_and_many_unneeded_columns_are_dropped(gpt2: tuple[Any, Any]) -> None:
    engine = _engine(gpt2)
    prompts = {1: " ".join(["the good movie"] * 25), 2: "a", 3: "hello world"}  # 1: 75 tokens
    engine.add(ipc.Generate(1, prompts[1], {**GREEDY, "max_new_tokens": 2}))
    engine.add(ipc.Generate(2, prompts[2], {**GREEDY, "max_new_tokens": 8}))
    engine.add(ipc.Generate(3, prompts[3], {**GREEDY, "max_new_tokens": 8}))
    first, first_ended = _run(engine, until_idle=False, steps=2)  # 1 leaves after its second token
    assert [s.stream_id for s in engine.running] == [2, 3]
    assert engine.mask.shape[1] <= 4  # the 74 leading columns only 1 needed went with it
    rest, _ = _run(engine)
    for stream_id in (2, 3):
        tokens = first[stream_id] + rest[stream_id]
        assert tokens == _alone(gpt2, prompts[stream_id], 8), stream_id
    assert first[1] == _alone(gpt2, prompts[1], 2) and first_ended[1].finish_reason == "length"


def _byte_level_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [" ".join(f"{w}{s}" for w in ("alpha", "beta", "gamma", "delta", "aaa", "aaaaaaaa") for s in ("", ",", ".", "ing"))] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.mark.parametrize("kind", ["word-level", "byte-level BPE"])
def test_an_over_long_prompt_keeps_the_same_last_tokens_from_its_tail_alone(gpt2: tuple[Any, Any], kind: str) -> None:
    """Only a long prompt's end is tokenized; the tokens kept are those of the whole prompt's."""
    import random

    from pipeserve.model.prompts import tail_ids

    tokenizer = gpt2[1] if kind == "word-level" else _byte_level_bpe()
    rng = random.Random(0)
    vocabulary = ["the", "cat", "dog", "alphabeta", "gammadelta,", "alpha.", "beta", "  ", "\n"]
    texts = ["".join(rng.choice(vocabulary) + rng.choice([" ", "", "  "]) for _ in range(length))
             for length in (10, 2_000, 60_000)]
    # One word of 100,000 letters (BPE pairs equal merges from its start), one with a space
    # 3,000 letters from its end, and a run of spaces before the end.
    texts += ["a" * 100_000, "a" * 100_001, "a" * 100_003, "b" * 100_000 + " " + "a" * 3_001,
              "the cat " * 5_000 + " " * 20_000 + "dog"]
    for room in (1, 7, 64, 500):
        for text in texts:
            whole = list(tokenizer(text)["input_ids"])
            tail = tail_ids(tokenizer, text, room, add_special_tokens=True)
            assert tail[-room:] == whole[-room:], (room, len(text), text[-20:])


def test_a_step_that_raises_while_prefilling_ends_every_stream_it_held(gpt2: tuple[Any, Any]) -> None:
    """A newcomer whose prefill raised (out of memory, a model error) is neither waiting nor
    running any more when the step fails: it must still get its error end, or its client waits
    until the front's stall watchdog kills a healthy worker."""
    from pipeserve.model_proc import _step

    model = gpt2[0]
    engine = _engine(gpt2)
    engine.add(ipc.Generate(1, "the good movie", {**GREEDY, "max_new_tokens": 20}))
    _run(engine, steps=2)  # 1 is running
    original = model.forward

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the prefill failed")

    engine.add(ipc.Generate(2, "hello world", GREEDY))
    engine.add(ipc.Generate(3, "a", GREEDY))
    model.forward = failing
    try:
        step = _step(engine)
    finally:
        model.forward = original
    assert sorted(end.stream_id for end in step.ended) == [1, 2, 3]
    assert {end.finish_reason for end in step.ended} == {"error"} and not engine.active
    engine.add(ipc.Generate(4, "the good movie", GREEDY))  # and the engine serves on
    tokens, ended = _run(engine)
    assert ended[4].finish_reason == "length" and len(tokens[4]) == GREEDY["max_new_tokens"]


class _LeadBytes:
    """The tests' tokenizer, but every token decodes to a UTF-8 lead byte: a character that
    never completes, as a byte-level tokenizer's text can be cut by max_new_tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    @staticmethod
    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        return (b"\xc3" * len(ids)).decode("utf-8", errors="replace")


def test_a_stream_that_ends_mid_character_sends_its_last_bytes(gpt2: tuple[Any, Any]) -> None:
    """Its pieces are held back (each ends mid-character); at its end, what was held is sent, as
    decode() writes it: it was dropped, and the streamed text was shorter than its tokens'."""
    model, tokenizer = gpt2
    engine = _engine((model, _LeadBytes(tokenizer)))
    engine.add(ipc.Generate(1, "the good movie", GREEDY))
    texts = []
    while engine.active:
        texts += [token.text for token in engine.step().tokens]
    assert len(texts) == GREEDY["max_new_tokens"] and "".join(texts) == "\ufffd" * len(texts)


def test_a_sequence_that_ends_mid_character_keeps_its_last_bytes() -> None:
    """A byte-level tokenizer splits "é" over two tokens; a piece ending mid-character is held
    back for the next token. A sequence that ends there sends what was held (as decode() writes
    an incomplete character, U+FFFD): it was dropped, so the text was shorter than its tokens'."""
    from pipeserve.model.sequence import Sequence

    def decode(ids: list[int], skip_special_tokens: bool = True) -> str:  # GPT-2's: errors="replace"
        return bytes(ids).decode("utf-8", errors="replace")

    sequence = Sequence(1, [], {"max_new_tokens": 2}, None, None)
    pieces = []
    for byte in "aé".encode()[:2]:  # b"a", then the first of é's two bytes
        sequence.generated.append(byte)
        pieces.append(sequence.next_piece(decode))
    assert pieces == ["a", ""] and sequence.finish_reason([]) == "length"
    assert sequence.next_piece(decode, final=True) == "\ufffd"
    assert "".join(pieces) + "\ufffd" == decode(sequence.generated)


def test_a_gpus_cache_reserves_rows_as_it_needs_them_a_cpus_all_at_once() -> None:
    """A CPU commits only the pages written, so every layer keeps room for --max-running-sequences
    rows; a GPU commits the whole buffer (one long stream could take 32 rows' memory and run out
    of it), so there the room doubles with the rows in use. `meta` stands for a GPU here."""
    import torch

    from pipeserve.model import kv_cache

    for device, reserved in (("cpu", 32), ("meta", 2)):
        block = torch.zeros((1, 2, 5, 4), device=device)
        layer = kv_cache.growing_layer([block], [block], 5, max_rows=32)
        assert layer._keys.shape[0] == reserved, device
        assert layer.room_for(1) and not layer.room_for(reserved)
    assert kv_cache.row_capacity(20, 32, "cuda") == 32 and kv_cache.row_capacity(3, 32, "cuda") == 6
