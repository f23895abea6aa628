"""Precision for text generation (issue #27 items 2 and 4): int8 layers (activations quantised
per row, and weight-only) against the float products they replace, the engine on an int8 model against transformers' own generate()
on the same layers, and `--dtype int8` through a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeserve.model import precision
from test_families import GREEDY, _alone, _model, _run


def _relative_error(got: Any, expected: Any) -> float:
    return float((got.float() - expected).abs().max() / expected.abs().max())


_VNNI = pytest.mark.skipif(not precision.has_vnni(), reason="8-bit activations need AVX-512 VNNI")


@pytest.mark.parametrize("activations", [pytest.param(True, marks=_VNNI), False], ids=["int8x8", "weight-only"])
@pytest.mark.parametrize("rows", [1, 4, 8, 9, 64])
def test_an_int8_layer_computes_the_float_product_within_int8_rounding(rows: int, activations: bool) -> None:
    """Every way an int8 layer multiplies (int8 activations: one row alone, or rows scaled to a
    shared range; weight-only: torch's int8 kernel up to DIRECT_ROWS rows, the dequantized weights
    beyond) gives the float32 product within int8 rounding."""
    import torch

    from pipeserve.model import weight_int8

    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 160)
    x = torch.randn(rows, 96)
    expected = linear(x).detach()
    layer = weight_int8._layer_class(torch, activations)(linear.weight.detach(), linear.bias)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 160)
    assert _relative_error(got, expected) < 0.02
    assert _relative_error(got, expected) > 0  # it did quantize: not the float32 product itself


@_VNNI
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # as served, and as weight-only's rest
def test_int8_activations_give_each_row_the_same_outputs_whatever_rows_are_beside_it(dtype: str) -> None:
    """fbgemm quantises a call's activations with one range; the layer scales each row to its
    own, so a row's outputs are bit-identical in any company of two rows or more (here beside a
    row 1,000 times larger and a row of zeros). One row alone has a range of its own: within
    8-bit rounding of the same."""
    import torch

    from pipeserve.model import weight_int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    layer = weight_int8._layer_class(torch, True)(linear.weight.detach(), linear.bias)
    rows = torch.randn(12, 256).to(getattr(torch, dtype))
    rows[3] *= 1000
    rows[5] = 0
    with torch.inference_mode():
        together = layer(rows)
        pairs = torch.cat([layer(rows[start:start + 2]) for start in range(0, 12, 2)])
        with_the_large_one = torch.cat([layer(rows[[index, 3]])[:1] for index in range(12)])
        alone = torch.cat([layer(row[None]) for row in rows])
    assert together.dtype == rows.dtype and together.shape == (12, 384)
    assert torch.equal(together, pairs) and torch.equal(together, with_the_large_one)
    assert torch.equal(together[5], layer.bias.to(rows.dtype))  # a padding row: the bias alone
    expected = linear(rows.float()).detach()
    for got in (together, alone):
        assert float(((got.float() - expected).norm(dim=1) / expected.norm(dim=1)).max()) < 0.02


@_VNNI
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_row_spoils_only_itself(bad: float) -> None:
    """A NaN or inf in one row (a diverging stream) gives that row non-finite outputs, which end
    that stream alone (the engine checks each row's logits), and leaves the others' untouched:
    fbgemm's range over the call must not see it, or the whole step would fail."""
    import torch

    from pipeserve.model import weight_int8

    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 32)
    layer = weight_int8._layer_class(torch, True)(linear.weight.detach(), linear.bias)
    rows = torch.randn(4, 64)
    spoiled = rows.clone()
    spoiled[0, 0] = bad  # the first value fbgemm's range search reads
    spoiled[2, 7] = bad
    with torch.inference_mode():
        got = layer(spoiled)
        clean = layer(rows[[1, 3]])
    assert not torch.isfinite(got[0]).all() and not torch.isfinite(got[2]).all()
    assert torch.equal(got[[1, 3]], clean)
    with torch.inference_mode():
        assert not torch.isfinite(layer(spoiled[:1])).all()  # alone too


@pytest.mark.parametrize("activations", [pytest.param(True, marks=_VNNI), False], ids=["int8x8", "weight-only"])
@pytest.mark.parametrize("features", [1, 3, 24])
def test_an_int8_layer_with_few_or_odd_input_features(activations: bool, features: int) -> None:
    """torch's weight-only kernel crashed the process (SIGSEGV) on rows not a multiple of 16 long."""
    import torch

    from pipeserve.model import weight_int8

    torch.manual_seed(features)
    linear = torch.nn.Linear(features, 8)
    layer = weight_int8._layer_class(torch, activations)(linear.weight.detach(), linear.bias)
    x = torch.randn(3, features)
    with torch.inference_mode():
        for rows in (x[:1], x):
            assert _relative_error(layer(rows), linear(rows).detach()) < 0.03


def test_an_int8_layers_wide_product_gives_each_row_the_int8_kernels_answer() -> None:
    """Weight-only, past DIRECT_ROWS rows a layer multiplies by the converted weights and scales
    the output after, as torch's int8 kernel does: each row's outputs are the kernel's for that row
    alone to one bfloat16 rounding, so a stream's numbers barely move with the rows beside it."""
    import torch

    from pipeserve.model import weight_int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=False)
    layer = weight_int8._layer_class(torch, False)(linear.weight.detach(), None)
    assert layer.qweight.dtype == torch.int8 and layer.scales.shape == (384,)
    rows = torch.randn(weight_int8.DIRECT_ROWS * 4, 256).to(torch.bfloat16)
    with torch.inference_mode():
        wide = layer(rows).float()
        alone = torch.cat([layer(row[None]) for row in rows]).float()
    assert wide.shape == alone.shape == (weight_int8.DIRECT_ROWS * 4, 384)
    # bfloat16 keeps 8 significant bits: two roundings of one value differ by at most 2^-7 of it.
    assert bool(((wide - alone).abs() <= alone.abs() * 2**-7).all())


def test_quantize_replaces_every_linear_and_gpt2_conv1d_layer(task_models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeserve.model import weight_int8

    model = AutoModelForCausalLM.from_pretrained(task_models["text-generation"]).eval()  # a GPT-2
    conv1d = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    linear = [m for m in model.modules() if type(m) is torch.nn.Linear]  # the output layer
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    swapped = weight_int8.quantize(model, torch)
    assert len(swapped) == len(conv1d) + len(linear) > 0
    assert not [m for m in model.modules() if type(m) is torch.nn.Linear or type(m).__name__ == "Conv1D"]
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    # With 8-bit activations the rest of the model stays float32 (fbgemm's own type), else bfloat16.
    rest = torch.float32 if weight_int8.quantizes_activations(torch) else torch.bfloat16
    assert got.dtype == rest
    assert _relative_error(got, expected) < 0.1  # int8 weights (and activations), through the model
    # The output layer's weight was tied to the input embeddings: those stay a float table.
    assert model.get_input_embeddings().weight.dtype == rest


@pytest.mark.parametrize("activations", [pytest.param(True, marks=_VNNI), False], ids=["int8x8", "weight-only"])
def test_int8_keeps_the_rest_float32_only_with_8_bit_activations(activations: bool,
                                                                  task_models: dict[str, Path]) -> None:
    """fbgemm takes and answers float32: bfloat16 between its products would only round; the
    weight-only kernel multiplies bfloat16."""
    import torch
    from transformers import AutoTokenizer

    from pipeserve.model import kv_cache, weight_int8

    model = _model("llama", AutoTokenizer.from_pretrained(task_models["text-generation"]))
    weight_int8.quantize(model, torch, activations)
    rest = torch.float32 if activations else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {rest}  # norms and embeddings (int8 weights are buffers)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert out.logits.dtype == rest
    assert {layer.keys.dtype for layer in kv_cache.cache_of(out).layers} == {rest}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("family", "activations"), [("llama", None), ("gpt-neox", None), ("opt", None),
                                                     ("llama", False)])
def test_streams_on_int8_weights_generate_what_each_prompt_gives_alone(
        family: str, activations: bool | None, task_models: dict[str, Path]) -> None:
    """Continuous batching on the int8 model (activations quantised where the CPU has VNNI, and
    weight-only): a stream joining and leaving a running batch gets the tokens the same int8
    model chooses for its prompt alone, recomputed without a cache."""
    import torch
    from transformers import AutoTokenizer

    from pipeserve import ipc
    from pipeserve.model import weight_int8
    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    model = _model(family, tokenizer)
    weight_int8.quantize(model, torch, activations)
    engine = Engine(model, tokenizer, max_running=8)
    prompts = {1: "the good movie", 2: "hello world this is a much longer prompt than the others"}
    engine.add(ipc.Generate(1, prompts[1], GREEDY))
    first = _run(engine, steps=2)
    engine.add(ipc.Generate(2, prompts[2], {**GREEDY, "max_new_tokens": 3}))
    rest = _run(engine)
    tokens = {1: first.get(1, []) + rest.get(1, []), 2: rest[2]}
    assert len(tokens[1]) == GREEDY["max_new_tokens"] and len(tokens[2]) == 3
    for stream, prompt in prompts.items():
        if weight_int8.quantizes_activations(torch) if activations is None else activations:
            # A recomputation rounds attention differently, and 8-bit activations turn a rounding
            # into a whole quantisation step: where two logits are that step apart (5.375 and
            # 5.3125 for this llama, measured with bfloat16 between the products), the argmax may
            # go either way.
            assert _greedy_within(model, tokenizer, prompt, tokens[stream], NEAR_TIE) , (family, stream)
        else:
            assert tokens[stream] == _alone(model, tokenizer, prompt, len(tokens[stream])), (family, stream)


# How far below the recomputed maximum logit a chosen token's may be (the tiny models' logits
# are a few units): a fraction of the gap between a model's first and third candidates.
NEAR_TIE = 0.25


def _greedy_within(model: Any, tokenizer: Any, prompt: str, tokens: list[int], tolerance: float) -> bool:
    """Whether each token's logit, recomputed on the prompt and the tokens before it (no cache),
    is within `tolerance` of that position's largest."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    sequence = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits
    chosen = logits[0, ids.shape[1] - 1:-1].float()
    gaps = chosen.max(dim=1).values - chosen[torch.arange(len(tokens)), torch.tensor(tokens)]
    return bool((gaps <= tolerance).all())


@pytest.mark.timeout(180)
def test_int8_generation_through_the_server(start_server: Any, task_models: dict[str, Path]) -> None:
    """--dtype int8 on a generator: int8 weights (and activations, with VNNI), said in /info with
    its agreement, and the streamed greedy tokens are those transformers' generate() gives on the
    same int8 layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeserve.model import weight_int8

    model_path = task_models["text-generation"]
    server = start_server("--model", str(model_path), "--dtype", "int8")
    info = server.info()
    assert info["dtype"] == "int8"
    assert info["precision"]["note"].endswith(weight_int8.ACTIVATIONS[weight_int8.quantizes_activations(torch)])
    assert info["precision"]["agreement"]["inputs"] >= 1  # the check texts that fit the positions
    assert info["details"]["decoding_steps"] == "transformers"  # GPT-2 is not built like a Llama
    reply = server.request("POST", "/generate", '{"inputs": "the good movie", "parameters": '
                           '{"max_new_tokens": 6, "do_sample": false, "details": true}}',
                           {"Content-Type": "application/json"}).json()
    served = [token["id"] for token in reply["details"]["tokens"]]

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    weight_int8.quantize(model, torch)
    ids = tokenizer("the good movie", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  min_new_tokens=6, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert served == expected.tolist()


def test_one_token_attention_equals_sdpa_with_grouped_heads_and_padding() -> None:
    """The decoding path's products against transformers' SDPA attention, in bfloat16, with
    grouped key/value heads and left padding masked out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeserve.model import attention

    torch.manual_seed(0)
    rows, heads, kv_heads, positions, dim = 8, 8, 2, 40, 16
    query = torch.randn(rows, heads, 1, dim).bfloat16()
    key = torch.randn(rows, kv_heads, positions, dim).bfloat16()
    value = torch.randn(rows, kv_heads, positions, dim).bfloat16()
    mask = torch.ones(rows, 1, 1, positions, dtype=torch.bool)
    mask[0, :, :, :30] = False  # a short row, left-padded
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    got, _ = attention.attend(module, query, key, value, mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (rows, 1, heads, dim)
    assert float((got.float() - expected.float()).abs().max()) < 0.02
    garbage = value.clone()
    garbage[0, :, :30] = 1e4  # what padding holds must not reach the answer
    assert torch.equal(attention.attend(module, query, key, garbage, mask, scaling=0.25)[0][0], got[0])


def test_one_token_attention_in_slices_of_rows_answers_as_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide step is computed a few rows at a time (float32 copies of its whole cache cost more
    than the products): each row's answer is bit-for-bit the one all rows at once give."""
    import torch

    from pipeserve.model import attention

    torch.manual_seed(2)
    rows, heads, kv_heads, positions, dim = 5, 4, 2, 30, 16
    query = torch.randn(rows, heads, 1, dim).bfloat16()
    key, value = (torch.randn(rows, kv_heads, positions, dim).bfloat16() for _ in range(2))
    mask = torch.ones(rows, 1, 1, positions, dtype=torch.bool)
    mask[2, :, :, :11] = False
    module = torch.nn.Module()
    whole, _ = attention.attend(module, query, key, value, mask, scaling=0.25)
    slices_of = {}
    for per_slice in (1, 2):
        monkeypatch.setattr(attention, "CHUNK_BYTES", per_slice * kv_heads * positions * 2 * dim * 4)
        slices_of[per_slice], _ = attention.attend(module, query, key, value, mask, scaling=0.25)
    assert torch.equal(slices_of[1], whole) and torch.equal(slices_of[2], whole)
    # A mask broadcast over the rows (one for all) is sliced like a mask per row.
    shared, _ = attention.attend(module, query, key, value, mask[2:3], scaling=0.25)
    assert torch.equal(shared[2], whole[2])


@pytest.mark.timeout(120)
def test_bfloat16_streams_on_the_decoding_path_generate_what_sdpa_gives(task_models: dict[str, Path]) -> None:
    """Ten streams at once, in bfloat16: the same greedy tokens as the model's SDPA attention,
    and the path did run, on every one-token step."""
    import torch
    from transformers import AttentionInterface, AutoTokenizer

    from pipeserve import ipc
    from pipeserve.model import attention
    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    prompts = {index: " ".join(["the good movie", "hello world", "a long one"][: 1 + index % 3]) + f" {index}"
               for index in range(10)}
    calls: list[tuple[int, int]] = []  # (rows, query tokens) of each call the decoding path received

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append((args[1].shape[0], args[1].shape[2]))
        return attention.attend(*args, **kwargs)

    answers = {}
    try:
        for implementation in ("sdpa", attention.NAME):
            model = _model("llama", tokenizer).to(torch.bfloat16)
            engine = Engine(model, tokenizer, max_running=16)  # switches SDPA to the decoding path
            assert model.config._attn_implementation == attention.NAME
            model.set_attn_implementation(implementation)
            AttentionInterface.register(attention.NAME, counted)
            for stream, prompt in prompts.items():
                engine.add(ipc.Generate(stream, prompt, GREEDY))
            answers[implementation] = _run(engine)
    finally:
        AttentionInterface.register(attention.NAME, attention.attend)
    assert (len(prompts), 1) in calls
    assert answers["sdpa"] == answers[attention.NAME]
    assert all(len(tokens) == GREEDY["max_new_tokens"] for tokens in answers["sdpa"].values())


@pytest.mark.timeout(120)
def test_a_bfloat16_stream_takes_the_decoding_path_alone_as_beside_others(
        task_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The path's rounding is not SDPA's, so which one runs must not depend on how many streams
    share a step: a lone stream's one-token steps take the path too (none falls back to SDPA),
    and each stream gives alone what it gives beside eleven others."""
    import torch
    from transformers import AttentionInterface, AutoTokenizer
    from transformers.integrations import sdpa_attention

    from pipeserve import ipc
    from pipeserve.model import attention
    from pipeserve.model.generation import Engine

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    prompts = {index: f"hello world {index} " + "the good movie " * (index % 4) for index in range(12)}
    model = _model("llama", tokenizer).to(torch.bfloat16)
    steps: list[int] = []  # the rows of each one-token step
    fell_back: list[int] = []  # the rows of each one-token step SDPA computed
    sdpa = sdpa_attention.sdpa_attention_forward

    def counted(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query.shape[2] == 1:
            steps.append(query.shape[0])
        return attention.attend(module, query, *args, **kwargs)

    def watched(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query.shape[2] == 1:
            fell_back.append(query.shape[0])
        return sdpa(module, query, *args, **kwargs)

    def generate(chosen: dict[int, str]) -> dict[int, list[int]]:
        engine = Engine(model, tokenizer, max_running=16)
        for stream, prompt in chosen.items():
            engine.add(ipc.Generate(stream, prompt, {**GREEDY, "max_new_tokens": 12}))
        return _run(engine)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", watched)
    attention.register()  # before replacing it: the first Engine would register it over `counted`
    AttentionInterface.register(attention.NAME, counted)
    try:
        together = generate(prompts)
        alone = {stream: generate({stream: prompt})[stream] for stream, prompt in prompts.items()}
    finally:
        AttentionInterface.register(attention.NAME, attention.attend)
    assert 1 in steps and len(prompts) in steps
    assert fell_back == []
    # The tiny model's wide weights leave no near-ties: bfloat16 is not batch-invariant in
    # general (bench/BATCH_INVARIANCE.md), but these tokens must not move.
    assert together == alone


# --- --dtype auto for generators: the fastest agreeing precision, timed at load -----------------------

WORD_PROMPTS = ("the cat sat on", "the good movie", "i love this film", "hello world from the big city of paris")


def _choose(task_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, agrees: dict[str, bool],
            seconds: dict[str, float]) -> tuple[Any, Any, dict[str, Any]]:
    """generation_dtype.choose on the tiny GPT-2 with bfloat16 taken as native, each candidate's
    agreement decided by `agrees` (its real comparison is still made) and its step time by `seconds`."""
    import torch

    from pipeserve.model import generation_dtype, precision
    from test_precision import _load, _weights

    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    monkeypatch.setattr(precision, "CHECK_TEXTS", WORD_PROMPTS)
    order = iter(["bfloat16", "int8"])
    real_compare = precision.compare

    def compare(reference: list[Any], reduced: list[Any]) -> Any:
        import dataclasses

        agreement = real_compare(reference, reduced)
        return dataclasses.replace(agreement, same_answers=agrees[next(order)])

    timed: list[str] = []

    def fake_time(call: Any, device: str, torch: Any, rows: int, dtype: str) -> float:
        timed.append(dtype)
        return seconds[dtype]

    monkeypatch.setattr(precision, "compare", compare)
    monkeypatch.setattr(generation_dtype, "_timed", fake_time)
    call = _load(task_models["text-generation"])
    before = _weights(call)
    chosen = generation_dtype.choose(call, "cpu", torch, 4)
    assert timed == ["float32", *[dtype for dtype in ("bfloat16", "int8") if agrees[dtype]]]  # only agreeing ones
    return call, chosen, before


def _int8_layers(call: Any) -> int:
    return sum(type(module).__name__ in ("Int8Linear", "Int8x8Linear") for module in call.pipe.model.modules())


def test_auto_keeps_the_fastest_agreeing_precision(task_models: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    call, chosen, _ = _choose(task_models, monkeypatch, {"bfloat16": True, "int8": True},
                              {"float32": 3.0, "bfloat16": 2.0, "int8": 1.0})
    assert chosen.dtype == "int8" and _int8_layers(call) > 0
    assert "float32 3000.0 ms, bfloat16 2000.0 ms, int8 1000.0 ms" in chosen.note
    assert call(list(WORD_PROMPTS[:1]), {"max_new_tokens": 3, "do_sample": False})  # and it serves


def test_auto_passes_over_a_faster_precision_that_disagrees(task_models: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    call, chosen, _ = _choose(task_models, monkeypatch, {"bfloat16": True, "int8": False},
                              {"float32": 3.0, "bfloat16": 2.0, "int8": 1.0})
    assert chosen.dtype == "bfloat16" and _int8_layers(call) == 0  # int8's layers were put back
    assert call.pipe.model.dtype == torch.bfloat16 and "int8 disagreed" in chosen.note


def test_auto_stays_float32_with_its_exact_weights_where_float32_is_fastest(
        task_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from test_precision import _weights

    call, chosen, before = _choose(task_models, monkeypatch, {"bfloat16": True, "int8": True},
                                   {"float32": 1.0, "bfloat16": 2.0, "int8": 3.0})
    assert chosen.dtype == "float32" and _int8_layers(call) == 0
    after = _weights(call)
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], before[name]) for name in before)


@pytest.mark.timeout(180)
def test_auto_for_a_generator_through_the_server_says_what_it_timed(start_server: Any,
                                                                    task_models: dict[str, Path]) -> None:
    server = start_server("--model", str(task_models["text-generation"]), "--max-running-sequences", "4")
    info = server.info()
    note = info["precision"]["note"]
    assert "1 + 4 streams' decoding step: float32 " in note and info["dtype"] in note
    reply = server.request("POST", "/generate", '{"inputs": "the good movie", "parameters": {"max_new_tokens": 3}}',
                           {"Content-Type": "application/json"})
    assert reply.status == 200 and reply.json()["generated_text"]


@pytest.mark.parametrize("fastest", ["float32", "bfloat16", "int8"])
def test_rotary_frequencies_stay_float32_whatever_auto_chooses(task_models: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, fastest: str) -> None:
    """A rotary model's frequency tables are computed at load, not saved: casting the model to
    bfloat16 and back would round them for good (load_state_dict cannot restore them), shifting
    rotary angles at long positions."""
    import torch
    from transformers import AutoTokenizer

    from pipeserve.model import generation_dtype, precision
    from test_precision import _load

    tokenizer = AutoTokenizer.from_pretrained(task_models["text-generation"])
    _model("llama", tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    call = _load(tmp_path)
    frequencies = {name: buffer.clone() for name, buffer in call.pipe.model.named_buffers() if "inv_freq" in name}
    assert frequencies and all(buffer.dtype == torch.float32 for buffer in frequencies.values())
    seconds = {"float32": 2.0, "bfloat16": 2.0, "int8": 2.0, fastest: 1.0}
    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    monkeypatch.setattr(precision, "compare", lambda reference, reduced: ipc_agreement())
    monkeypatch.setattr(generation_dtype, "_timed", lambda call, device, torch, rows, dtype: seconds[dtype])
    assert generation_dtype.choose(call, "cpu", torch, 2).dtype == fastest
    buffers = dict(call.pipe.model.named_buffers())
    for name, original in frequencies.items():
        assert buffers[name].dtype == torch.float32 and torch.equal(buffers[name], original), name


def ipc_agreement() -> Any:
    from pipeserve import ipc

    return ipc.Agreement(same_answers=True, inputs=1)


def test_one_token_attention_with_a_value_size_other_than_the_keys() -> None:
    """Some models (DeepSeek-V2/V3, MiniCPM3) have value heads of another size than key heads."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeserve.model import attention

    torch.manual_seed(1)
    rows, heads, positions = 8, 4, 12
    query, key = torch.randn(rows, heads, 1, 16).bfloat16(), torch.randn(rows, heads, positions, 16).bfloat16()
    value = torch.randn(rows, heads, positions, 24).bfloat16()
    module = torch.nn.Module()
    got, _ = attention.attend(module, query, key, value, None, scaling=0.25)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    assert got.shape == expected.shape == (rows, 1, heads, 24)
    assert float((got.float() - expected.float()).abs().max()) < 0.02


@pytest.mark.parametrize(("int8_seconds", "expected"), [(2.8, "float32"), (2.6, "int8")])
def test_auto_keeps_float32_unless_another_is_clearly_faster(task_models: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             int8_seconds: float, expected: str) -> None:
    """A precision within the timing's noise of float32 (here 7 % faster) is not worth its
    rounding; one 13 % faster is kept."""
    from pipeserve.model import generation_dtype

    assert generation_dtype.CLEAR_GAIN == 0.10
    call, chosen, _ = _choose(task_models, monkeypatch, {"bfloat16": False, "int8": True},
                              {"float32": 3.0, "int8": int8_seconds})
    assert chosen.dtype == expected and (_int8_layers(call) > 0) == (expected == "int8")
    assert "float32 unless another is 10 % faster" in chosen.note
