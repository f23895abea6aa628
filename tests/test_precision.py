"""--dtype auto: the reduced precision is kept only where its answers agree with float32's.

The rule's pieces in-process (the comparison, the thresholds, the hardware detection, the check
and its fallback on a real tiny model), then through a real `python -m pipeserve`.
"""

from __future__ import annotations

import json
import platform
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeserve import ipc
from pipeserve.model import precision

pytestmark = pytest.mark.timeout(180)


def test_same_labels_and_words_agree_whatever_the_scores() -> None:
    reference = [[{"label": "POSITIVE", "score": 0.61}], [{"entity": "B-PER", "word": "ann", "start": 0}]]
    reduced = [[{"label": "POSITIVE", "score": 0.6}], [{"entity": "B-PER", "word": "ann", "start": 0}]]
    agreement = precision.compare(reference, reduced)
    assert agreement == ipc.Agreement(same_answers=True, inputs=2)
    assert precision.agrees(agreement)


@pytest.mark.parametrize("reduced", [
    [[{"label": "NEGATIVE", "score": 0.61}]],  # another top label
    [[{"label": "POSITIVE", "score": 0.61}, {"label": "NEGATIVE", "score": 0.39}]],  # another length
    [[{"generated_text": " the cat"}]],  # other generated tokens
])
def test_any_other_label_word_or_token_disagrees(reduced: list[Any]) -> None:
    reference = [[{"label": "POSITIVE", "score": 0.61}]] if "generated_text" not in str(reduced) \
        else [[{"generated_text": " the dog"}]]
    agreement = precision.compare(reference, reduced)
    assert not agreement.same_answers and not precision.agrees(agreement)


def test_embeddings_agree_by_cosine_mean_and_floor() -> None:
    rng = np.random.default_rng(0)
    reference = [rng.standard_normal(384).astype(np.float32) for _ in range(4)]
    close = [v + 1e-4 * rng.standard_normal(384).astype(np.float32) for v in reference]
    agreement = precision.compare(reference, close)
    assert agreement.same_answers and agreement.min_cosine is not None
    assert agreement.min_cosine > 0.9999 and precision.agrees(agreement)

    one_off = [*close[:3], reference[3] + 0.05 * rng.standard_normal(384).astype(np.float32)]
    drifted = precision.compare(reference, one_off)
    assert drifted.min_cosine is not None and drifted.min_cosine < precision.MIN_COSINE
    assert not precision.agrees(drifted)  # one input under the floor is enough

    lists = precision.compare([v.tolist() for v in reference], [v.tolist() for v in close])
    assert lists.mean_cosine == pytest.approx(agreement.mean_cosine)  # the JSON form counts the same


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse avx512f avx512_vnni", None),
    ("fpu sse avx512f avx512_bf16", "bfloat16"),
    ("fpu sse amx_tile amx_bf16", "bfloat16"),
])
def test_cpu_bfloat16_only_where_native(tmp_path: Path, flags: str, expected: str | None) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert precision.native_reduced_dtype("cpu", types.SimpleNamespace(), cpuinfo) == expected


@pytest.mark.parametrize(("native", "emulated", "expected"),
                         [(True, True, "bfloat16"), (False, True, "float16"), (False, False, "float16")])
def test_gpus_reduce_to_what_they_support(native: bool, emulated: bool, expected: str) -> None:
    """torch reports bf16 "supported" on a GPU that only emulates it (V100, T4): float16 there."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated)

    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_bf16_supported=is_bf16_supported))
    assert precision.native_reduced_dtype("cuda:0", torch) == expected


@pytest.mark.parametrize(("own", "device", "bf16_native", "served"), [
    ("bfloat16", "cuda:0", True, True), ("bfloat16", "cuda:0", False, False),  # a T4: checked instead
    ("float16", "cuda:0", False, True), ("float32", "cuda:0", True, False), ("bfloat16", "cpu", True, False)])
def test_a_gpu_serves_a_reduced_checkpoint_as_it_is_only_where_it_computes_that_natively(
        own: str, device: str, bf16_native: bool, served: bool) -> None:
    from pipeserve.model import loading

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return bf16_native or including_emulation

    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_bf16_supported=is_bf16_supported))
    assert loading.computes_natively(own, device, torch) is served


def _load(model: Path) -> Any:
    import torch

    from pipeserve.model import loading

    spec = ipc.WorkerSpec(model=str(model), task=None, pipeline=None, device="cpu", dtype="auto",
                          threads=1, max_worker_memory=None, log_level="warning")
    return loading.load_transformers(spec, "cpu", torch, "float32")


def _weights(call: Any) -> dict[str, Any]:
    return {name: tensor.detach().clone() for name, tensor in call.pipe.model.state_dict().items()}


# --- references computed with transformers and torch directly, not through pipeserve ------------


def _token_vectors(model: Path, texts: Any, dtype: str = "float32") -> list[np.ndarray]:
    """Each text's per-token vectors from the bare transformers model in `dtype` (as float32)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    bare = AutoModel.from_pretrained(model).eval().to(getattr(torch, dtype))
    with torch.inference_mode():
        return [bare(**tokenizer(text, return_tensors="pt", truncation=True,
                                 max_length=bare.config.max_position_embeddings)
                     ).last_hidden_state[0].float().numpy() for text in texts]


def _cosines(reference: list[np.ndarray], other: list[np.ndarray]) -> list[float]:
    """One cosine per input, over all its values (as the agreement check reads an embedding)."""
    cosines = []
    for a, b in zip(reference, other, strict=True):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        cosines.append(float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64))))
    return cosines


def _nearer(served: np.ndarray, expected: np.ndarray, other: np.ndarray) -> bool:
    """`served` is `expected` up to rounding, and clearly not `other` (another dtype's answer)."""
    return bool(np.abs(served - expected).mean() < 0.25 * np.abs(other - expected).mean())


def _greedy(model: Path, texts: Any, dtype: str, max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Each text's greedy continuation by transformers' generate, one text at a time: its token
    ids and each one's log-probability."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    bare = AutoModelForCausalLM.from_pretrained(model).eval().to(getattr(torch, dtype))
    continuations = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt")
            output = bare.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                                   output_logits=True)
            ids = output.sequences[0, encoded["input_ids"].shape[1]:].tolist()
            logprobs = [float(torch.log_softmax(logits[0].float(), -1)[token])
                        for logits, token in zip(output.logits, ids, strict=True)]
            continuations.append((ids, logprobs))
    return continuations


def _greedy_ids(model: Path, texts: Any, dtype: str, max_new_tokens: int) -> list[list[int]]:
    return [ids for ids, _ in _greedy(model, texts, dtype, max_new_tokens)]


def _packing_expected() -> None:
    """Skip where no weights can be packed (prepack: oneDNN, x86 CPUs only); decided here, not
    by prepack.pays, so that a machine where packing should happen but does not fails."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN weight packing on this machine: nothing packed to compare")


def _layers_packed(server: Any) -> int:
    return int(server.wait_log("linear layers packed for oneDNN once:").rsplit(":", 1)[1])


def test_an_agreeing_model_is_cast_and_answers_in_bfloat16(tiny_models: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    monkeypatch.setattr(precision, "MEAN_COSINE", 0.99)  # a tiny random model rounds more than a real one
    monkeypatch.setattr(precision, "MIN_COSINE", 0.98)
    call = _load(tiny_models["feature-extraction"])
    chosen = precision.choose(call, "cpu", torch)
    assert chosen.agreement is not None and chosen.agreement.inputs == len(precision.CHECK_TEXTS)
    assert chosen.agreement.min_cosine is not None and chosen.agreement.min_cosine >= 0.98
    assert (chosen.dtype, chosen.candidate) == ("bfloat16", "bfloat16")
    assert call.pipe.model.dtype == torch.bfloat16
    [vector] = call(["still serving"], {})
    assert vector.dtype == np.float32 and np.isfinite(vector).all()


def test_a_disagreeing_model_goes_back_to_its_exact_float32_weights(
        tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    monkeypatch.setattr(precision, "MEAN_COSINE", 1.01)  # nothing can agree
    call = _load(tiny_models["feature-extraction"])
    before = _weights(call)
    chosen = precision.choose(call, "cpu", torch)
    assert chosen.dtype == "float32" and chosen.candidate == "bfloat16"
    assert "disagreed with float32" in chosen.note
    after = _weights(call)
    assert after.keys() == before.keys()
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], before[name]) for name in before)


# Prompts in the tiny generator's vocabulary: its greedy continuations are words. The check's own
# texts are mostly outside it, and their continuations are <unk> tokens that decode to "" in
# either dtype: an agreement on those would hold whatever the tokens were.
WORD_PROMPTS = ("the cat sat on", "the good movie", "i love this film", "hello world from the big city of paris")
GREEDY = {"max_new_tokens": 8, "do_sample": False}


def test_generation_is_checked_on_greedy_tokens(task_models: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoTokenizer

    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    model = task_models["text-generation"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    call = _load(model)
    inputs, parameters = call.agreement_inputs(list(precision.CHECK_TEXTS))
    assert parameters == GREEDY
    # The texts whose prompt and 8 new tokens fit the model's 128 positions: all but the long one.
    fitting = [text for text in precision.CHECK_TEXTS if len(tokenizer(text)["input_ids"]) + 8 <= 128]
    assert inputs == fitting and 0 < len(inputs) < len(precision.CHECK_TEXTS)

    monkeypatch.setattr(precision, "CHECK_TEXTS", WORD_PROMPTS)
    float32 = _greedy_ids(model, WORD_PROMPTS, "float32", 8)
    bfloat16 = _greedy_ids(model, WORD_PROMPTS, "bfloat16", 8)
    words = [tokenizer.decode(ids, skip_special_tokens=True) for ids in float32]
    assert all(words) and len(set(words)) == len(words)  # an answer of its own per prompt: nothing vacuous
    chosen = precision.choose(call, "cpu", torch)
    assert chosen.agreement is not None and chosen.agreement.mean_cosine is None  # text, not vectors
    assert chosen.agreement.inputs == len(WORD_PROMPTS)
    assert chosen.agreement.same_answers == (bfloat16 == float32)
    assert chosen.dtype == ("bfloat16" if bfloat16 == float32 else "float32")
    assert str(call.pipe.model.dtype) == f"torch.{chosen.dtype}"


def test_generation_whose_greedy_tokens_change_in_bfloat16_stays_float32(task_models: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoTokenizer

    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    monkeypatch.setattr(precision, "CHECK_TEXTS", WORD_PROMPTS)
    model = task_models["text-generation"]
    call = _load(model)
    before = _weights(call)
    bare = call.pipe.model
    cast = bare.to
    hooks: list[Any] = []

    def cast_and_shift(*args: Any, **kwargs: Any) -> Any:
        """In bfloat16 the model's greedy choice is the next token id; nothing else differs."""
        result = cast(*args, **kwargs)
        if args and args[0] is torch.bfloat16:
            hooks.append(bare.lm_head.register_forward_hook(lambda module, inputs, logits: logits.roll(1, -1)))
        else:
            while hooks:
                hooks.pop().remove()
        return result

    bare.to = cast_and_shift
    chosen = precision.choose(call, "cpu", torch)
    assert chosen.agreement is not None and not chosen.agreement.same_answers
    assert (chosen.dtype, chosen.candidate) == ("float32", "bfloat16") and "disagreed with float32" in chosen.note
    assert not hooks and bare.dtype == torch.float32
    after = _weights(call)
    assert all(torch.equal(after[name], before[name]) for name in before)
    tokenizer = AutoTokenizer.from_pretrained(model)
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in _greedy_ids(model, WORD_PROMPTS, "float32", 8)]
    assert [answer[0]["generated_text"] for answer in call(list(WORD_PROMPTS), GREEDY)] == expected


def test_auto_reports_its_choice_and_agreement(start_server: Any, tiny_models: dict[str, Path]) -> None:
    model = tiny_models["feature-extraction"]
    server = start_server("--model", str(model), "--device", "cpu")
    info = server.info()
    chosen = info["precision"]
    assert chosen["requested"] == "auto" and info["dtype"] == chosen["dtype"]
    assert f"in {chosen['dtype']} in" in server.log
    native = precision.native_reduced_dtype("cpu", types.SimpleNamespace())
    text = "served in the chosen precision"
    [float32] = _token_vectors(model, [text])
    served = np.asarray(server.post_json({"inputs": text}).json(), dtype=np.float32).reshape(float32.shape)
    if native is None:
        assert chosen["dtype"] == "float32" and "no native bfloat16" in chosen["note"]
        np.testing.assert_allclose(served, float32, rtol=1e-5, atol=1e-6)
        return
    # The agreement, recomputed here: the bare model in float32 and in the native dtype.
    cosines = _cosines(_token_vectors(model, precision.CHECK_TEXTS),
                       _token_vectors(model, precision.CHECK_TEXTS, native))
    agreement = ipc.Agreement(**chosen["agreement"])
    assert agreement.inputs == len(precision.CHECK_TEXTS) and agreement.same_answers
    assert agreement.mean_cosine == pytest.approx(np.mean(cosines), abs=1e-6)
    assert agreement.min_cosine == pytest.approx(min(cosines), abs=1e-6)
    holds = np.mean(cosines) >= precision.MEAN_COSINE and min(cosines) >= precision.MIN_COSINE
    assert chosen["dtype"] == (native if holds else "float32")
    [reduced] = _token_vectors(model, [text], native)
    if holds:
        assert _nearer(served, reduced, float32)
    else:
        np.testing.assert_allclose(served, float32, rtol=1e-5, atol=1e-6)


def test_an_explicit_dtype_is_obeyed_without_a_check(start_server: Any, tiny_models: dict[str, Path]) -> None:
    model = tiny_models["feature-extraction"]
    server = start_server("--model", str(model), "--dtype", "bfloat16")
    chosen = server.info()["precision"]
    assert chosen == {"requested": "bfloat16", "dtype": "bfloat16", "candidate": None, "agreement": None,
                      "note": ""}
    reply = server.post_json({"inputs": "obeyed"})
    assert reply.status == 200, reply.body
    [float32], [bfloat16] = _token_vectors(model, ["obeyed"]), _token_vectors(model, ["obeyed"], "bfloat16")
    assert _nearer(np.asarray(reply.json(), dtype=np.float32).reshape(bfloat16.shape), bfloat16, float32)


def test_served_embeddings_with_packed_layers_equal_the_plain_models(
        start_server: Any, tiny_models: dict[str, Path]) -> None:
    _packing_expected()
    model = tiny_models["feature-extraction"]
    server = start_server("--model", str(model), "--dtype", "float32")
    assert _layers_packed(server) > 0
    text = "packed once, answered the same"
    reply = server.post_json({"inputs": text})
    assert reply.status == 200, reply.body
    [plain] = _token_vectors(model, [text])  # the bare transformers model, its nn.Linear layers untouched
    np.testing.assert_allclose(np.asarray(reply.json()).reshape(plain.shape), plain, rtol=1e-5, atol=1e-6)


def test_served_classification_with_packed_layers_scores_as_the_plain_model(
        start_server: Any, tiny_models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _packing_expected()
    model = tiny_models["text-classification"]
    server = start_server("--model", str(model), "--dtype", "float32")
    assert _layers_packed(server) > 0
    text = "packed once, scored the same"
    reply = server.post_json({"inputs": text, "parameters": {"top_k": 2}})
    assert reply.status == 200, reply.body
    bare = AutoModelForSequenceClassification.from_pretrained(model).eval()
    with torch.inference_mode():
        probabilities = bare(**AutoTokenizer.from_pretrained(model)(text, return_tensors="pt")).logits[0].softmax(-1)
    plain = sorted(((bare.config.id2label[index], float(p)) for index, p in enumerate(probabilities)),
                   key=lambda item: -item[1])
    served = np.asarray(reply.json()).ravel().tolist()  # [[{label, score}, ...]] for one text
    assert [item["label"] for item in served] == [label for label, _ in plain]
    np.testing.assert_allclose([item["score"] for item in served], [score for _, score in plain],
                               rtol=1e-5, atol=1e-6)


def test_served_generation_with_packed_layers_streams_the_plain_models_tokens(
        start_server: Any, task_models: dict[str, Path]) -> None:
    _packing_expected()
    model = task_models["text-generation"]
    server = start_server("--model", str(model), "--dtype", "float32")
    assert _layers_packed(server) > 0
    prompt = "the cat sat on"
    reply = server.request("POST", "/generate_stream",
                           json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": 10, "do_sample": False}}),
                           {"Content-Type": "application/json"})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream"), reply.body
    events = [json.loads(line[5:]) for line in reply.body.splitlines() if line.startswith(b"data:")]
    [(ids, logprobs)] = _greedy(model, [prompt], "float32", 10)
    assert len(ids) == 10  # no EOS among them: the stream must send all ten
    assert [event["token"]["id"] for event in events] == ids
    np.testing.assert_allclose([event["token"]["logprob"] for event in events], logprobs, rtol=1e-4, atol=1e-5)
    assert events[-1]["details"]["finish_reason"] == "length"


def _vnni_cpuinfo(tmp_path: Path, flags: str) -> Path:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {flags}\n")
    return cpuinfo


def test_int8_needs_vnni_and_a_cpu(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import torch

    call = _load(tiny_models["feature-extraction"])
    with pytest.raises(ValueError, match="VNNI"):
        precision.quantize_int8(call, "cpu", torch, _vnni_cpuinfo(tmp_path, "sse avx2 avx512f"))
    # AVX-VNNI alone (Alder Lake, Sierra Forest): fbgemm has no kernel for it and runs its AVX2
    # one, whose int16 pair sums 8-bit activations saturate.
    with pytest.raises(ValueError, match="VNNI"):
        precision.quantize_int8(call, "cpu", torch, _vnni_cpuinfo(tmp_path, "avx2 avx_vnni"))
    with pytest.raises(ValueError, match="CPU only"):
        precision.quantize_int8(call, "cuda", torch, _vnni_cpuinfo(tmp_path, "avx512_vnni"))


def test_int8_holding_its_floor_serves_quantized_layers(tiny_models: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(precision, "INT8_MEAN_COSINE", 0.5)  # a tiny random model is no real one
    monkeypatch.setattr(precision, "INT8_MIN_COSINE", 0.5)
    call = _load(tiny_models["feature-extraction"])
    chosen = precision.quantize_int8(call, "cpu", torch, _vnni_cpuinfo(tmp_path, "avx512_vnni"))
    assert (chosen.requested, chosen.dtype) == ("int8", "int8") and chosen.agreement is not None
    linears = [m for m in call.pipe.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every Linear is now a dynamic int8 one
    [vector] = call(["served in int8"], {})
    assert np.isfinite(vector).all()


def test_int8_below_its_floor_serves_the_float32_model(tiny_models: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(precision, "INT8_MEAN_COSINE", 1.01)
    call = _load(tiny_models["feature-extraction"])
    original = call.pipe.model
    chosen = precision.quantize_int8(call, "cpu", torch, _vnni_cpuinfo(tmp_path, "avx512_vnni"))
    assert chosen.dtype == "float32" and "fell below its floor" in chosen.note
    assert call.pipe.model is original


def _int8_token_vectors(model: Path, texts: Any) -> list[np.ndarray]:
    """Each text's per-token vectors from the bare model with torch's stock dynamic int8 Linear
    layers (per-channel weights; torch's 7-bit activations, where pipeserve uses 8)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        bare = quantize_dynamic(AutoModel.from_pretrained(model).eval(),
                                {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        tokenizer = AutoTokenizer.from_pretrained(model)
        with torch.inference_mode():
            return [bare(**tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
                         ).last_hidden_state[0].float().numpy() for text in texts]


def test_int8_through_the_server(start_server: Any, tiny_models: dict[str, Path]) -> None:
    model = tiny_models["feature-extraction"]
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    vnni = "avx512_vnni" in flags
    server = start_server("--model", str(model), "--dtype", "int8", ready=vnni)
    if not vnni:
        assert server.wait_exit(60) == 3 and "needs a CPU with AVX-512 VNNI" in server.log
        return
    # Whether int8 holds its floor on this model, worked out here with torch's own quantisation.
    cosines = _cosines(_token_vectors(model, precision.CHECK_TEXTS), _int8_token_vectors(model, precision.CHECK_TEXTS))
    mean, least = float(np.mean(cosines)), min(cosines)
    margins = (mean - precision.INT8_MEAN_COSINE, least - precision.INT8_MIN_COSINE)
    assert all(abs(margin) > 0.002 for margin in margins), f"too near the floor to call: {cosines}"
    holds = all(margin > 0 for margin in margins)
    chosen = server.info()["precision"]
    assert (chosen["requested"], chosen["dtype"]) == ("int8", "int8" if holds else "float32")
    agreement = ipc.Agreement(**chosen["agreement"])
    assert agreement.inputs == len(precision.CHECK_TEXTS) and agreement.same_answers
    assert agreement.min_cosine is not None and agreement.min_cosine < 1.0  # the layers were quantised
    assert agreement.mean_cosine == pytest.approx(mean, abs=1e-3)
    text = "int8 or its fallback"
    reply = server.post_json({"inputs": text})
    assert reply.status == 200, reply.body
    [float32] = _token_vectors(model, [text])
    served = np.asarray(reply.json(), dtype=np.float32).reshape(float32.shape)
    if holds:  # served by the int8 layers: near float32's answer, and not it
        assert not np.allclose(served, float32, rtol=1e-5, atol=1e-6)
        assert _cosines([float32], [served])[0] >= precision.INT8_MIN_COSINE
    else:
        np.testing.assert_allclose(served, float32, rtol=1e-5, atol=1e-6)
