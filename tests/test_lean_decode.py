"""Decoding steps without transformers' per-layer calls (model/lean_decode.py): taken by
Llama-shaped models only where a step gives transformers' answers bit for bit, in every
precision, alone and in a batch with padding; every other model keeps transformers' steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeserve import ipc
from test_families import FAMILIES, GREEDY, _alone, _model

LEAN = ("llama", "qwen2")


def _tokenizer(task_models: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(task_models["text-generation"])


def _in(model: Any, dtype: str) -> Any:
    import torch

    from pipeserve.model import weight_int8

    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    elif dtype == "int8":
        weight_int8.quantize(model, torch)
    return model


def _steps(engine: Any) -> list[tuple[int, int, float]]:
    """Stream 1 alone for two steps, then stream 2 (a longer prompt: stream 1's rows move right,
    padded) joins, and leaves first: every token with its log-probability."""
    engine.add(ipc.Generate(1, "the good movie", {**GREEDY, "max_new_tokens": 8}))
    tokens = [token for _ in range(2) for token in engine.step().tokens]
    engine.add(ipc.Generate(2, "hello world this is a much longer prompt than the others", {**GREEDY, "max_new_tokens": 3}))
    while engine.active:
        tokens += engine.step().tokens
    return [(token.stream_id, token.id, token.logprob) for token in tokens]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("family", LEAN)
def test_llama_shaped_models_decode_on_the_lean_path_with_transformers_answers(
        family: str, dtype: str, task_models: dict[str, Path]) -> None:
    """Joining, padded, leaving: the same tokens and log-probabilities, bit for bit, as the same
    engine through transformers' forward. In bfloat16 the norms' weights are random (a trained
    model's), where torch's fused rms_norm rounds otherwise than the module: the model's own norms."""
    import torch

    from pipeserve.model.generation import Engine

    tokenizer = _tokenizer(task_models)
    model = _model(family, tokenizer)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model = _in(model, dtype)
    lean = Engine(model, tokenizer, max_running=4)
    assert lean._lean is not None
    assert lean._lean.fused_norms is (dtype != "bfloat16" and model.model.norm.weight.dtype == torch.float32)
    theirs = Engine(model, tokenizer, max_running=4)
    theirs._lean = None
    got = _steps(lean)
    assert [(stream, token) for stream, token, _ in got] and got == _steps(theirs)
    assert {stream for stream, _, _ in got} == {1, 2}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", [family for family in FAMILIES if family not in LEAN])
def test_other_families_keep_transformers_steps(family: str, task_models: dict[str, Path]) -> None:
    """Gemma (scaled embeddings, offset norms), Phi-3 (fused projections), GPT-NeoX, OPT, and the
    caches that cannot grow in place (a sliding window, recurrent states)."""
    import torch

    from pipeserve.model import lean_decode

    model = _model(family, _tokenizer(task_models))
    assert lean_decode.verified(model, torch) is None


@pytest.mark.timeout(120)
def test_a_model_computing_otherwise_than_the_lean_step_keeps_transformers_steps(task_models: dict[str, Path]) -> None:
    """Built like a Llama, but a layer computes something else (here its output scaled): the
    check at load compares answers, not shapes. A hook on any module, or a forward replaced on
    one (accelerate's way), keeps them too."""
    import torch

    from pipeserve.model import lean_decode

    model = _model("llama", _tokenizer(task_models))
    assert lean_decode.verified(model, torch) is not None
    layer = model.model.layers[1]
    own_class = type(layer)

    class Scaled(own_class):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return super().forward(*args, **kwargs) * 1.5

    layer.__class__ = Scaled
    assert lean_decode.shaped(model)
    assert lean_decode.verified(model, torch) is None
    layer.__class__ = own_class
    handle = model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: None)
    assert not lean_decode.shaped(model)
    handle.remove()
    model.model.norm.forward = model.model.norm.forward
    assert not lean_decode.shaped(model)
    del model.model.norm.forward
    assert lean_decode.verified(model, torch) is not None


@pytest.mark.timeout(180)
def test_a_llama_served_decodes_on_the_lean_path(start_server: Any, task_models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """Through a real server: /info and the model process's log say it took the lean path, and the
    streamed greedy tokens are the model's own choice recomputed without a cache at every step."""
    tokenizer = _tokenizer(task_models)
    model = _model("llama", tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    server = start_server("--model", str(tmp_path), "--dtype", "float32", "--log-level", "info")
    assert server.info()["details"]["decoding_steps"] == "lean (fused norms)"  # float32 on a CPU
    server.wait_log("decoding steps skip transformers' per-layer calls")
    reply = server.request("POST", "/generate", '{"inputs": "the good movie", "parameters": '
                           '{"max_new_tokens": 6, "do_sample": false, "details": true}}',
                           {"Content-Type": "application/json"}).json()
    served = [token["id"] for token in reply["details"]["tokens"]]
    assert served == _alone(model, tokenizer, "the good movie", 6)


def test_a_failed_check_drops_stacked_groups_waiting_products(
        task_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that fails midway (here the MLP's activation raises after the stacked gate/up
    product was computed, before the up projection took its slice) keeps transformers' steps and
    leaves no group's product waiting: its next real call would warn that its members were
    handed different inputs."""
    import torch

    from pipeserve.model import lean_decode, weight_int8

    model = _model("llama", _tokenizer(task_models))
    weight_int8.quantize(model, torch)
    mlp = model.model.layers[0].mlp
    groups = [module.shared for module in model.modules() if hasattr(module, "shared")]
    assert mlp.gate_proj.shared in groups

    def fails(self: Any, x: Any) -> Any:
        raise RuntimeError("an activation that fails")

    monkeypatch.setattr(type(mlp.act_fn), "forward", fails)
    assert lean_decode.verified(model, torch) is None
    assert not any(group._waiting for group in groups) and all(group._output is None for group in groups)
