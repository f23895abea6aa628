"""Prefix reuse (issue #27 item 3): a conversation's next turn prefills only what follows the
keys and values kept from its earlier turns. Through a real server with the openai SDK, beside a
server with reuse off: the same greedy replies, turn by turn, and OpenAI's
usage.prompt_tokens_details.cached_tokens saying how much was reused. Then the store's bounds."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
SYSTEM = " ".join(["you answer questions about movies and say what was good in them"] * 6)


@pytest.fixture(scope="module")
def llama_chat(task_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a chat template (wide weights: no near-ties for greedy choices)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-chat")
    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.5, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reusing(llama_chat: Path) -> Iterator[Server]:
    server = Server(["--model", str(llama_chat), "--dtype", "float32"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def not_reusing(llama_chat: Path) -> Iterator[Server]:
    server = Server(["--model", str(llama_chat), "--dtype", "float32", "--prefix-cache-bytes", "0"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _openai(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


def _turn(server: Server, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    """One greedy turn: the reply, its prompt tokens and the cached ones among them."""
    answer = _openai(server).chat.completions.create(
        model="any", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    usage = answer.usage
    return answer.choices[0].message.content, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


@pytest.mark.timeout(180)
def test_each_turn_reuses_the_conversation_so_far_and_replies_as_without_reuse(
        reusing: Server, not_reusing: Server) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    cached_by_turn = []
    for question in ("what is a good movie", "and why was it good", "who was in it"):
        history.append({"role": "user", "content": question})
        reply, prompt_tokens, cached = _turn(reusing, history)
        expected, expected_prompt_tokens, none_cached = _turn(not_reusing, history)
        assert (reply, prompt_tokens) == (expected, expected_prompt_tokens)
        assert reply and none_cached == 0
        cached_by_turn.append((cached, prompt_tokens))
        history.append({"role": "assistant", "content": reply})
    assert cached_by_turn[0][0] == 0  # nothing kept yet
    for (cached, prompt_tokens), (_, earlier_prompt_tokens) in zip(cached_by_turn[1:], cached_by_turn, strict=False):
        # The earlier turn's whole prompt at least (its reply too, as far as it tokenizes alike).
        assert earlier_prompt_tokens <= cached < prompt_tokens
    metrics = reusing.request("GET", "/metrics").body.decode()
    counted = re.search(r'^pipeserve_cached_prompt_tokens_total\{model="[^"]+"\} (\S+)$', metrics, re.M)
    assert counted is not None and float(counted.group(1)) == sum(cached for cached, _ in cached_by_turn)


@pytest.mark.timeout(120)
def test_a_streamed_turn_reports_its_cached_tokens_in_the_usage_event(reusing: Server) -> None:
    messages = [{"role": "system", "content": SYSTEM + " streamed"}, {"role": "user", "content": "hello"}]
    reply, _, _ = _turn(reusing, messages)
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    events = list(_openai(reusing).chat.completions.create(
        model="any", messages=messages, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    usage = events[-1].usage
    assert usage is not None and usage.completion_tokens == 4
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


# --- the store's bounds, in-process ---------------------------------------------------------------


def _layers(tokens: int, layers: int = 2) -> list[tuple[Any, Any]]:
    import torch

    return [(torch.full((1, 2, tokens, 4), float(layer)), torch.full((1, 2, tokens, 4), -float(layer)))
            for layer in range(layers)]


copied_lengths: list[int] = []  # the token counts of every copy the store asked for


def _keep(store: Any, tokens: list[int]) -> None:
    """Offer the store these tokens, with keys and values it may ask to be copied."""
    layers = _layers(len(tokens))

    def copy() -> list[tuple[Any, Any]]:
        copied_lengths.append(len(tokens))
        return layers

    store.keep(tokens, sum(k.nbytes + v.nbytes for k, v in layers), copy)


def test_the_store_keeps_within_its_bytes_least_recently_used_out() -> None:
    from pipeserve.model.prefix_cache import MIN_TOKENS, PrefixCache

    one = sum(k.nbytes + v.nbytes for k, v in _layers(MIN_TOKENS + 8))
    store = PrefixCache(max_bytes=2 * one)
    first, second, third = ([n] * (MIN_TOKENS + 8) for n in (1, 2, 3))
    _keep(store, first)
    _keep(store, second)
    assert store.lookup([*first, 7]) is not None  # first is now the more recently used
    _keep(store, third)  # no room for three: second goes
    assert store.nbytes == 2 * one
    assert store.lookup([*second, 7]) is None
    assert store.lookup([*first, 7]) is not None and store.lookup([*third, 7]) is not None
    copied_lengths.clear()
    _keep(store, [9] * (MIN_TOKENS + 8) * 3)  # larger than the whole store
    assert len(store.entries) == 2 and store.nbytes == 2 * one and not copied_lengths  # and never copied


def test_a_longer_turn_replaces_the_entry_it_extends_and_a_hit_leaves_a_token_to_prefill() -> None:
    from pipeserve.model.prefix_cache import MIN_TOKENS, PrefixCache

    store = PrefixCache(max_bytes=1 << 20)
    turn = list(range(MIN_TOKENS + 4))
    copied_lengths.clear()
    _keep(store, turn)
    _keep(store, turn[:-2])  # already held within the first: nothing added, nothing copied
    assert copied_lengths == [len(turn)]
    longer = [*turn, 1000, 1001]
    _keep(store, longer)
    assert [entry.tokens for entry in store.entries.values()] == [longer]
    hit = store.lookup(longer)  # the very same prompt: its last token is prefilled for its logits
    assert hit is not None and hit.length == len(longer) - 1
    assert [keys.shape[2] for keys, _ in hit.layers()] == [len(longer) - 1] * 2
    assert store.lookup([*turn[:MIN_TOKENS - 1], 5000]) is None  # too short a share to be worth a lone prefill
    _keep(store, list(range(MIN_TOKENS - 1)))
    assert len(store.entries) == 1 and copied_lengths == [len(turn), len(longer)]
