"""Every common task end to end through a real server: one input, a list, concurrent batches."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, counters, png_bytes, post_all, wav_bytes
from test_serving import _close, _shape

# A batch waits this long for more requests (counted from its first): the concurrent requests
# below share batches however the machine schedules their sending.
BATCH_DELAY = ("--max-batch-delay-ms", "50")


def _pipeline(model: Path, task: str, dtype: str) -> Any:
    """The task's own transformers pipeline in `dtype`, in this process: answers worked out
    without pipeserve."""
    import torch
    from transformers import pipeline

    return pipeline(task, model=str(model), dtype=getattr(torch, dtype), device="cpu")


def _plain(value: Any) -> Any:
    """A pipeline's answer as JSON reads it (numpy scalars made Python numbers)."""
    return json.loads(json.dumps(value, default=lambda item: item.item()))


def _check_consistent(server: Server, inputs: list[Any], parameters: dict[str, Any],
                      compare_values: bool = True, nested_single: bool = False) -> list[Any]:
    """Alone, in a list and in concurrent requests, each input answers the same shape; returns
    each input's answer alone. `nested_single`: the task answers one input as a list of one
    answer (text-classification, as the Inference API does)."""

    def single(value: Any) -> Any:
        if not nested_single:
            return value
        assert isinstance(value, list) and len(value) == 1, value
        return value[0]

    alone_replies = [server.post_json({"inputs": item, "parameters": parameters}) for item in inputs]
    assert all(reply.status == 200 for reply in alone_replies), [r.body for r in alone_replies]
    alone = [single(reply.json()) for reply in alone_replies]
    as_list = server.post_json({"inputs": inputs, "parameters": parameters})
    assert as_list.status == 200, as_list.body
    documents = [{"inputs": item, "parameters": parameters} for item in inputs * 4]
    before = counters(server)
    concurrent = asyncio.run(post_all(server, documents))
    after = counters(server)
    assert all(answer.status == 200 for answer in concurrent), concurrent
    # These requests' inputs, and no others, ran; and some of them shared a batch.
    assert after["items"] - before["items"] == len(documents)
    assert 1 <= after["batches"] - before["batches"] < len(documents)
    assert len(as_list.json()) == len(inputs)
    for index, answer_alone in enumerate(alone):
        assert _shape(answer_alone) == _shape(as_list.json()[index])
        for answer in concurrent[index::len(inputs)]:  # the same input, in every round
            assert _shape(answer_alone) == _shape(single(answer.body))
        if compare_values:
            assert _close(answer_alone, as_list.json()[index])
    return alone


def test_text_classification_top_k_and_function_to_apply(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["text-classification"]), *BATCH_DELAY)
    texts = ["a good movie", "the food was very very bad and i hate it"]
    # Each input answers a list of {label, score}, best first, even with the default top_k of 1.
    default = _check_consistent(server, texts, {}, nested_single=True)
    assert len(default[0]) == 1 and set(default[0][0]) == {"label", "score"}
    both = _check_consistent(server, texts, {"top_k": 2, "function_to_apply": "sigmoid"}, nested_single=True)
    assert len(both[0]) == 2 and {item["label"] for item in both[0]} == {"POSITIVE", "NEGATIVE"}
    assert both[0][0]["score"] >= both[0][1]["score"]
    assert all(0 < item["score"] < 1 for item in both[1])
    bad = server.post_json({"inputs": "x", "parameters": {"function_to_apply": "cube"}})
    assert bad.status == 400


def test_token_classification_with_aggregation(start_server: Any, task_models: dict[str, Path]) -> None:
    model = task_models["token-classification"]
    server = start_server("--model", str(model), *BATCH_DELAY)
    texts = ["the king of france", "hello world from paris the capital city"]
    raw = _check_consistent(server, texts, {})
    grouped = _check_consistent(server, texts, {"aggregation_strategy": "simple"})
    # The same answers as transformers' own pipeline (in the dtype the server chose), and none
    # of them empty: the tiny model tags a word or more of each text.
    reference = _pipeline(model, "token-classification", server.info()["dtype"])
    for text, tokens, groups in zip(texts, raw, grouped, strict=True):
        expected_tokens = _plain(reference(text))
        expected_groups = _plain(reference(text, aggregation_strategy="simple"))
        assert expected_tokens and expected_groups
        assert all({"entity", "score", "index", "word", "start", "end"} <= set(item) for item in tokens)
        assert all({"entity_group", "score", "word", "start", "end"} <= set(item) for item in groups)
        assert _close(tokens, expected_tokens), (tokens, expected_tokens)
        assert _close(groups, expected_groups), (groups, expected_groups)
        assert all(text[item["start"]:item["end"]] == item["word"].lstrip("#") for item in tokens)


def test_fill_mask_top_k_and_targets(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["fill-mask"]), *BATCH_DELAY)
    texts = ["the [MASK] is good", "paris is the capital of [MASK] and a very big city"]
    top = _check_consistent(server, texts, {"top_k": 3})
    assert len(top[0]) == 3
    targeted = _check_consistent(server, texts, {"targets": ["france", "king"]})
    assert {item["token_str"] for item in targeted[1]} == {"france", "king"}


def test_zero_shot_classification(start_server: Any, task_models: dict[str, Path]) -> None:
    server = start_server("--model", str(task_models["zero-shot-classification"]),
                          "--task", "zero-shot-classification", *BATCH_DELAY)
    texts = ["the movie was good", "paris is a big city in france"]
    labels = ["film", "city", "food"]
    # Each input answers [{label, score}], best first.
    single = _check_consistent(server, texts, {"candidate_labels": labels})
    assert sorted(item["label"] for item in single[0]) == sorted(labels)
    assert abs(sum(item["score"] for item in single[0]) - 1) < 1e-4
    assert [item["score"] for item in single[0]] == sorted((item["score"] for item in single[0]), reverse=True)
    multi = _check_consistent(server, texts, {"candidate_labels": labels, "multi_label": True})
    assert sorted(item["label"] for item in multi[1]) == sorted(labels)
    missing = server.post_json({"inputs": "x"})
    assert missing.status == 400
    unknown = server.post_json({"inputs": "x", "parameters": {"candidate_label": labels}})
    assert unknown.status == 400 and "candidate_label" in unknown.json()["error"]


def test_text_generation(start_server: Any, task_models: dict[str, Path]) -> None:
    # POST / on a generator is TGI's: every prompt runs in the continuous-batching engine.
    server = start_server("--model", str(task_models["text-generation"]))
    texts = ["the king", "hello world from the big city of paris"]
    greedy = {"max_new_tokens": 4, "do_sample": False, "return_full_text": True, "ignore_eos": True}
    alone = [server.post_json({"inputs": text, "parameters": greedy}) for text in texts]
    assert all(reply.status == 200 for reply in alone), [reply.body for reply in alone]
    assert [set(reply.json()[0]) for reply in alone] == [{"generated_text"}] * 2
    assert alone[0].json()[0]["generated_text"].startswith("the king")
    before = server.info()["counters"]["streams"]
    together = server.post_json({"inputs": texts, "parameters": greedy})  # a list: one answer per prompt
    assert together.status == 200 and len(together.json()) == 2
    assert together.json()[1]["generated_text"].startswith("hello world")
    assert server.info()["counters"]["streams"]["steps"] > before["steps"]  # the engine ran them
    # By default the continuation only (TGI's default).
    continuation = server.post_json({"inputs": texts[1], "parameters": {"max_new_tokens": 3}})
    assert not continuation.json()[0]["generated_text"].startswith("hello world")
    raw = server.request("POST", "/", "the king", {"Content-Type": "text/plain"})  # a raw body is one prompt
    assert raw.status == 200 and set(raw.json()[0]) == {"generated_text"}
    sampled = server.post_json({"inputs": texts, "parameters": {"max_new_tokens": 3, "do_sample": True}})
    assert sampled.status == 200 and len(sampled.json()) == 2
    assert server.post_json({"inputs": "x", "parameters": {"max_new_tokenz": 3}}).status == 400
    zero = server.post_json({"inputs": "x", "parameters": {"max_new_tokens": 0}})
    assert zero.status == 400 and '"parameters.max_new_tokens" must be an integer >= 1' in zero.json()["error"]
    beams = server.post_json({"inputs": "x", "parameters": {"num_beams": 4}})  # a pipeline option TGI lacks
    assert beams.status == 400 and "num_beams" in beams.json()["error"]


def test_image_classification_raw_and_base64(start_server: Any, task_models: dict[str, Path]) -> None:
    server = start_server("--model", str(task_models["image-classification"]), *BATCH_DELAY)
    assert server.info()["input"] == "image"
    red, blue = png_bytes(color=(220, 20, 20)), png_bytes(80, 50, (20, 20, 220))
    raw = server.request("POST", "/", red, {"Content-Type": "image/png"})
    assert raw.status == 200, raw.body
    assert {item["label"] for item in raw.json()} == {"cat", "dog", "bird"}
    encoded = [base64.b64encode(red).decode(), "data:image/png;base64," + base64.b64encode(blue).decode()]
    results = _check_consistent(server, encoded, {"top_k": 2})
    assert _close(results[0], raw.json()[:2])
    assert server.request("POST", "/", b"not an image", {"Content-Type": "image/png"}).status == 400
    assert server.post_json({"inputs": "%%%"}).status == 400
    assert server.request("POST", "/", "some text", {"Content-Type": "text/plain"}).status == 400


def test_audio_classification_with_wav_bytes(start_server: Any, task_models: dict[str, Path]) -> None:
    server = start_server("--model", str(task_models["audio-classification"]), *BATCH_DELAY)
    assert server.info()["input"] == "audio"
    tone, other = wav_bytes(0.5), wav_bytes(0.8, rate=8000, frequency=220.0)  # resampled to 16 kHz
    raw = server.request("POST", "/", tone, {"Content-Type": "audio/wav"})
    assert raw.status == 200, raw.body
    assert {item["label"] for item in raw.json()} == {"yes", "no"}
    results = _check_consistent(server, [base64.b64encode(tone).decode(), base64.b64encode(other).decode()],
                                {}, compare_values=False)  # padding changes wav2vec2's values slightly
    assert _shape(results[0]) == _shape(raw.json())
    assert server.request("POST", "/", b"RIFF nonsense", {"Content-Type": "audio/wav"}).status == 400


def test_text_model_refuses_binary_bodies(start_server: Any, tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["text-classification"]))
    reply = server.request("POST", "/", png_bytes(), {"Content-Type": "image/png"})
    assert reply.status == 400 and "takes text" in reply.json()["error"]


@pytest.mark.parametrize("dtype", ["float32"])
def test_explicit_cpu_device_and_dtype(start_server: Any, tiny_models: dict[str, Path], dtype: str) -> None:
    server = start_server("--model", str(tiny_models["text-classification"]), "--device", "cpu",
                          "--dtype", dtype)
    info = server.info()
    assert info["device"] == "cpu" and info["dtype"] == dtype
    reply = server.post_json({"inputs": "fine", "parameters": {"top_k": 2}})
    assert reply.status == 200, reply.body
    expected = _plain(_pipeline(tiny_models["text-classification"], "text-classification", dtype)("fine", top_k=2))
    assert _close(reply.json(), [expected]), (reply.json(), expected)


def test_cuda_requested_without_cuda_fails_to_load(start_server: Any, tiny_models: dict[str, Path]) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    server = start_server("--model", str(tiny_models["text-classification"]), "--device", "cuda", ready=False)
    assert server.wait_exit(60) == 3
    assert "CUDA is not available" in server.log


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_half_precision(start_server: Any, tiny_models: dict[str, Path], task_models: dict[str, Path],
                            dtype: str) -> None:
    for model in (tiny_models["text-classification"], task_models["image-classification"]):
        server = start_server("--model", str(model), "--device", "auto", "--dtype", dtype)
        info = server.info()
        assert info["device"] == "cuda" and info["dtype"] == dtype
        body = png_bytes() if "image" in str(model) else b"the movie was good"
        content_type = "image/png" if "image" in str(model) else "text/plain"
        reply = server.request("POST", "/", body, {"Content-Type": content_type})
        assert reply.status == 200, reply.body
        server.stop()
