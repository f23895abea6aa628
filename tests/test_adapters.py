"""The feature-extraction adapter's batch path answers exactly what the transformers pipeline does.

In-process, on a tiny random BERT: every pooling, both padding sides, truncation of an over-long
input; the pipeline path is taken by passing `tokenize_kwargs` (which only the pipeline handles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeserve.model import embeddings, pooling, tasks

pytestmark = pytest.mark.timeout(120)

TEXTS = ["a", "the movie was good", "the book was very very bad " * 3, "good"]


def _call(model: Path, padding_side: str) -> embeddings.FeatureExtractionCall:
    from transformers import pipeline

    pipe = pipeline("feature-extraction", model=str(model), device="cpu")
    pipe.tokenizer.padding_side = padding_side
    return embeddings.FeatureExtractionCall(pipe, tasks.task_for("feature-extraction"), pooling.SentencePooling())


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_batch_path_answers_what_the_pipeline_answers(tiny_models: dict[str, Path], padding_side: str) -> None:
    call = _call(tiny_models["feature-extraction"], padding_side)
    for mode in ("mean", "cls", "max", "none"):
        parameters: dict[str, Any] = {"pooling": mode, "normalize": mode != "none"}
        batched = call(TEXTS, parameters)
        batched_counts = call.token_counts()
        through_pipeline = call(TEXTS, {**parameters, "tokenize_kwargs": {}})
        assert batched_counts == call.token_counts() and batched_counts is not None
        assert len(set(batched_counts)) > 1  # the batch was padded
        for mine, theirs in zip(batched, through_pipeline, strict=True):
            assert np.asarray(mine).shape == np.asarray(theirs).shape
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
        if mode == "none":
            assert [np.asarray(v).shape[1] for v in batched] == batched_counts


def test_an_over_long_input_is_truncated_on_the_asked_side(tiny_models: dict[str, Path]) -> None:
    call = _call(tiny_models["feature-extraction"], "right")
    limit = call.pipe.tokenizer.model_max_length
    long = " ".join(["good"] * (limit + 20)) + " bad"
    for side in ("right", "left"):
        parameters = {"pooling": "none", "normalize": False, "truncation_direction": side}
        [mine] = call([long, "a"], parameters)[:1]
        [theirs] = call([long, "a"], {**parameters, "tokenize_kwargs": {}})[:1]
        assert np.asarray(mine).shape[1] == limit
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packed_linear_layers_answer_what_the_plain_ones_answer(tiny_models: dict[str, Path], dtype: str) -> None:
    import torch

    from pipeserve.model import prepack

    call = _call(tiny_models["feature-extraction"], "right")
    call.pipe.model.to(getattr(torch, dtype))
    plain = call(TEXTS, {"pooling": "none", "normalize": False})
    linears = sum(type(m) is torch.nn.Linear for m in call.pipe.model.modules())
    assert linears > 0
    assert prepack.apply(call, torch) == linears  # every one packed, the answers unchanged
    assert not any(type(m) is torch.nn.Linear for m in call.pipe.model.modules())
    packed = call(TEXTS, {"pooling": "none", "normalize": False})
    for mine, theirs in zip(packed, plain, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)


def test_packing_that_changes_the_answers_is_undone(tiny_models: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pipeserve.model import prepack

    call = _call(tiny_models["feature-extraction"], "right")
    call.pipe.model.to(torch.bfloat16)
    layers = [m for m in call.pipe.model.modules() if type(m) is torch.nn.Linear]
    monkeypatch.setattr(prepack, "SAME_COSINE", 1.5)  # no answer can pass: the check must undo it
    assert prepack.apply(call, torch) == 0
    assert [m for m in call.pipe.model.modules() if type(m) is torch.nn.Linear] == layers


def _text_call(model: Path, task: str) -> Any:
    """The adapter the model process would serve `task` with, in float32 (no precision check)."""
    import torch

    from pipeserve import ipc
    from pipeserve.model import loading

    spec = ipc.WorkerSpec(model=str(model), task=task, pipeline=None, device="cpu", dtype="float32",
                          threads=1, max_worker_memory=None, log_level="warning")
    return loading.load_transformers(spec, "cpu", torch, "float32")


def test_classification_packs_every_linear_and_scores_the_same(tiny_models: dict[str, Path]) -> None:
    import torch

    from pipeserve.model import prepack

    call = _text_call(tiny_models["text-classification"], "text-classification")
    assert prepack.suits(call)
    every_label = {"top_k": None}
    plain = call(TEXTS, every_label)
    linears = sum(type(m) is torch.nn.Linear for m in call.pipe.model.modules())
    assert prepack.apply(call, torch) == linears > 0  # the classifier head too
    packed = call(TEXTS, every_label)
    for mine, theirs in zip(packed, plain, strict=True):
        assert [item["label"] for item in mine] == [item["label"] for item in theirs]
        np.testing.assert_allclose([item["score"] for item in mine], [item["score"] for item in theirs],
                                   rtol=1e-5, atol=1e-6)


def test_a_tied_output_layer_is_packed_as_a_copy(tiny_models: dict[str, Path],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from pipeserve.model import prepack

    call = _text_call(tiny_models["fill-mask"], "fill-mask")
    model = call.pipe.model
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()  # tied
    text = [f"the {call.pipe.tokenizer.mask_token} was good"]
    [before] = call(text, {"top_k": 3})
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    with caplog.at_level("INFO", logger="pipeserve.model"):
        assert prepack.apply(call, torch) == linears  # the tied decoder too
    assert "packed a copy of" in caplog.text  # the shared weight is now held twice, and it says so
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    assert model.get_input_embeddings().weight is embedding  # the lookup keeps the original
    [again] = call(text, {"top_k": 3})
    assert [guess["token"] for guess in again] == [guess["token"] for guess in before]
    np.testing.assert_allclose([guess["score"] for guess in again], [guess["score"] for guess in before],
                               rtol=1e-5, atol=1e-6)


def test_a_generator_packs_its_conv1d_layers_and_head_and_generates_the_same(
        task_models: dict[str, Path]) -> None:
    import torch

    from pipeserve.model import prepack

    call = _text_call(task_models["text-generation"], "text-generation")
    model = call.pipe.model
    layers = sum(type(m).__name__ in ("Conv1D", "Linear") for m in model.modules())
    assert layers > model.config.n_layer * 4  # GPT-2: four Conv1D a block, and the (tied) head
    greedy = {"max_new_tokens": 12, "do_sample": False}
    before = call(["the cat sat on", "a"], greedy)
    assert prepack.suits(call)
    assert prepack.apply(call, torch) == layers
    assert not any(type(m).__name__ in ("Conv1D", "Linear") for m in model.modules())
    assert call(["the cat sat on", "a"], greedy) == before


def test_which_tasks_pack_their_weights() -> None:
    packed = {name for name, task in tasks.TASKS.items() if task.packs_weights}
    assert packed == {"feature-extraction", "text-classification", "token-classification", "fill-mask",
                      "zero-shot-classification", "text-generation"}
    assert not tasks.task_for("text2text-generation").packs_weights  # not in the registry: left alone
