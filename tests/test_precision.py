"""--dtype auto: the reduced precision is kept only where its answers agree with float32's.

The rule's pieces in-process (the comparison, the thresholds, the hardware detection, the check
and its fallback on a real tiny model), then through a real `python -m pipeserve`.
"""

from __future__ import annotations

import types
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


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_gpus_reduce_to_what_they_support(bf16: bool, expected: str) -> None:
    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_bf16_supported=lambda: bf16))
    assert precision.native_reduced_dtype("cuda:0", torch) == expected


def _load(model: Path) -> Any:
    import torch

    from pipeserve.model import loading

    spec = ipc.WorkerSpec(model=str(model), task=None, pipeline=None, device="cpu", dtype="auto",
                          threads=1, max_worker_memory=None, log_level="warning")
    return loading.load_transformers(spec, "cpu", torch, "float32")


def _weights(call: Any) -> dict[str, Any]:
    return {name: tensor.detach().clone() for name, tensor in call.pipe.model.state_dict().items()}


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


def test_generation_is_checked_on_greedy_tokens(task_models: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(precision, "native_reduced_dtype", lambda device, torch: "bfloat16")
    call = _load(task_models["text-generation"])
    inputs, parameters = call.agreement_inputs(list(precision.CHECK_TEXTS))
    assert parameters == {"max_new_tokens": 8, "do_sample": False}
    assert 0 < len(inputs) < len(precision.CHECK_TEXTS)  # the long text would overflow 128 positions
    chosen = precision.choose(call, "cpu", torch)
    assert chosen.agreement is not None and chosen.agreement.mean_cosine is None  # text, not vectors
    assert chosen.dtype == ("bfloat16" if chosen.agreement.same_answers else "float32")
    assert str(call.pipe.model.dtype) == f"torch.{chosen.dtype}"


def test_auto_reports_its_choice_and_agreement(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["feature-extraction"]), "--device", "cpu")
    info = server.info()
    chosen = info["precision"]
    assert chosen["requested"] == "auto" and info["dtype"] == chosen["dtype"]
    assert f"in {chosen['dtype']} in" in server.log
    if precision.native_reduced_dtype("cpu", types.SimpleNamespace()) is None:
        assert chosen["dtype"] == "float32" and "no native bfloat16" in chosen["note"]
    else:
        agreement = ipc.Agreement(**chosen["agreement"])
        assert agreement.inputs == len(precision.CHECK_TEXTS)
        assert chosen["dtype"] == ("bfloat16" if precision.agrees(agreement) else "float32")
    reply = server.post_json({"inputs": "served in the chosen precision"})
    assert reply.status == 200 and np.asarray(reply.json()).shape[-1] == 32  # hidden_size


def test_an_explicit_dtype_is_obeyed_without_a_check(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["feature-extraction"]), "--dtype", "bfloat16")
    chosen = server.info()["precision"]
    assert chosen == {"requested": "bfloat16", "dtype": "bfloat16", "candidate": None, "agreement": None,
                      "note": ""}
    assert server.post_json({"inputs": "obeyed"}).status == 200


def test_served_embeddings_with_packed_layers_equal_the_plain_models(
        start_server: Any, tiny_models: dict[str, Path]) -> None:
    import torch

    from pipeserve.model import prepack

    model = tiny_models["feature-extraction"]
    server = start_server("--model", str(model), "--dtype", "float32")
    text = "packed once, answered the same"
    reply = server.post_json({"inputs": text})
    assert reply.status == 200
    if prepack.pays("cpu", "float32", torch):  # an x86 CPU with oneDNN
        packed = int(server.wait_log("linear layers packed for oneDNN once:").rsplit(":", 1)[1])
        assert packed > 0
    else:
        assert "linear layers packed" not in server.log
    [plain] = _load(model)([text], {})  # the same model in-process, its nn.Linear layers untouched
    np.testing.assert_allclose(np.asarray(reply.json()), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_served_classification_with_packed_layers_scores_as_the_plain_model(
        start_server: Any, tiny_models: dict[str, Path]) -> None:
    import torch

    from pipeserve.model import prepack

    model = tiny_models["text-classification"]
    server = start_server("--model", str(model), "--dtype", "float32")
    text = "packed once, scored the same"
    reply = server.post_json({"inputs": text, "parameters": {"top_k": 2}})
    assert reply.status == 200
    if prepack.pays("cpu", "float32", torch):
        assert int(server.wait_log("linear layers packed for oneDNN once:").rsplit(":", 1)[1]) > 0
    [plain] = _load(model)([text], {"top_k": 2})
    served = np.asarray(reply.json()).ravel().tolist()  # [[{label, score}, ...]] for one text
    assert [item["label"] for item in served] == [item["label"] for item in plain]
    np.testing.assert_allclose([item["score"] for item in served], [item["score"] for item in plain],
                               rtol=1e-5, atol=1e-6)


def test_served_generation_with_packed_layers_streams_the_plain_models_tokens(
        start_server: Any, task_models: dict[str, Path]) -> None:
    import torch

    from pipeserve.model import prepack

    model = task_models["text-generation"]
    server = start_server("--model", str(model), "--dtype", "float32")
    greedy = {"max_new_tokens": 10, "do_sample": False}
    reply = server.post_json({"inputs": "the cat sat on", "parameters": greedy})
    assert reply.status == 200
    if prepack.pays("cpu", "float32", torch):
        assert int(server.wait_log("linear layers packed for oneDNN once:").rsplit(":", 1)[1]) > 0
    [plain] = _load(model)(["the cat sat on"], greedy)
    served = reply.json()
    assert (served[0] if isinstance(served, list) else served)["generated_text"] == plain[0]["generated_text"]


def _vnni_cpuinfo(tmp_path: Path, flags: str) -> Path:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {flags}\n")
    return cpuinfo


def test_int8_needs_vnni_and_a_cpu(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import torch

    call = _load(tiny_models["feature-extraction"])
    with pytest.raises(ValueError, match="VNNI"):
        precision.quantize_int8(call, "cpu", torch, _vnni_cpuinfo(tmp_path, "sse avx2 avx512f"))
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
    chosen = precision.quantize_int8(call, "cpu", torch, _vnni_cpuinfo(tmp_path, "avx_vnni"))
    assert chosen.dtype == "float32" and "fell below its floor" in chosen.note
    assert call.pipe.model is original


def test_int8_through_the_server(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["feature-extraction"]), "--dtype", "int8",
                          ready=precision.cpu_flags() & precision._VNNI_CPU_FLAGS != set())
    if not precision.cpu_flags() & precision._VNNI_CPU_FLAGS:
        assert server.wait_exit(60) == 3 and "needs a CPU with VNNI" in server.log
        return
    chosen = server.info()["precision"]
    assert chosen["requested"] == "int8" and chosen["dtype"] in ("int8", "float32")
    assert ipc.Agreement(**chosen["agreement"]).inputs == len(precision.CHECK_TEXTS)
    assert server.post_json({"inputs": "int8 or its fallback"}).status == 200
