"""The clients people already run, unchanged, against a real `python -m pipeserve`:
huggingface_hub's InferenceClient, the openai SDK, LangChain's OpenAIEmbeddings, and the TEI
routes' shapes checked against TEI's own OpenAPI document."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from huggingface_hub import InferenceClient

from conftest import TESTS_DIR, Server, _bert_tokenizer, png_bytes, wav_bytes
from pipeserve.front.machine import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, gpu_likely

TEI_OPENAPI = json.loads((TESTS_DIR / "data" / "tei_openapi.json").read_text())


def tei_schema(name: str) -> dict[str, Any]:
    """A TEI component schema with its $refs inlined and OpenAPI's `nullable` made JSON Schema."""
    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(TEI_OPENAPI["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]])
            resolved = {key: resolve(value) for key, value in node.items() if key not in ("example", "default")}
            if resolved.pop("nullable", False):
                resolved = {"anyOf": [resolved, {"type": "null"}]}
            return resolved
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(copy.deepcopy(TEI_OPENAPI["components"]["schemas"][name]))


def assert_tei_shape(value: Any, schema: str) -> None:
    jsonschema.validate(value, tei_schema(schema))


def _serve(*args: str) -> Iterator[Server]:
    server = Server(list(args))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def embedder() -> Iterator[Server]:
    """The embedded all-MiniLM-L6-v2: a real sentence-transformers model (mean pooling, normalised)."""
    yield from _serve("--max-batch-delay-ms", "2")


@pytest.fixture(scope="module")
def classifier(tiny_models: dict[str, Path]) -> Iterator[Server]:
    yield from _serve("--model", str(tiny_models["text-classification"]))


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A cross-encoder: text-classification with one relevance score (num_labels=1)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("reranker")
    torch.manual_seed(1)
    tokenizer = _bert_tokenizer(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1,
                        id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    yield from _serve("--model", str(folder))


def hf(server: Server) -> InferenceClient:
    # provider="hf-inference": huggingface_hub 2.4 refuses health_check/get_endpoint_info without it.
    return InferenceClient(model=f"http://127.0.0.1:{server.port}", provider="hf-inference", timeout=60)


# --- huggingface_hub InferenceClient -----------------------------------------------------------


def test_inference_client_feature_extraction_with_its_root_options(embedder: Server) -> None:
    client = hf(embedder)
    vector = client.feature_extraction("The quick brown fox.")
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
    cut = client.feature_extraction("The quick brown fox.", normalize=True, truncate=True, dimensions=8,
                                    truncation_direction="left")
    assert cut.shape == (8,) and abs(float(np.linalg.norm(cut)) - 1) < 1e-4
    assert np.allclose(cut, vector[:8] / np.linalg.norm(vector[:8]), atol=1e-5)
    batch = client.feature_extraction(["one", "two words"])  # type: ignore[arg-type]
    assert batch.shape == (2, 384)


def test_inference_client_health_and_endpoint_info(embedder: Server) -> None:
    client = hf(embedder)
    assert client.health_check() is True
    info = client.get_endpoint_info()
    assert info["task"] == "feature-extraction" and info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert_tei_shape(info, "Info")  # TEI's fields, beside pipeserve's own
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 256
    # The batch budget in force: the CPU default here, as TEI clients size their batches by it.
    assert info["max_batch_tokens"] == (GPU_BATCH_TOKENS if gpu_likely("auto") else CPU_BATCH_TOKENS)


def test_inference_client_text_classification_top_k_and_function(classifier: Server) -> None:
    client = hf(classifier)
    top = client.text_classification("a good movie")
    assert len(top) == 1 and top[0].label in ("POSITIVE", "NEGATIVE")
    both = client.text_classification("a good movie", top_k=2, function_to_apply="softmax")
    assert [item.label for item in both] != [] and len(both) == 2
    assert both[0].score >= both[1].score and abs(both[0].score + both[1].score - 1) < 1e-4
    raw = client.text_classification("a good movie", top_k=2, function_to_apply="none")
    assert abs(raw[0].score + raw[1].score - 1) > 1e-6  # logits, not probabilities


def test_inference_client_fill_mask_and_token_classification(start_server: Any, tiny_models: dict[str, Path],
                                                             task_models: dict[str, Path]) -> None:
    import torch
    from transformers import pipeline

    fill = hf(start_server("--model", str(tiny_models["fill-mask"])))
    predictions = fill.fill_mask("the [MASK] is good", top_k=3)
    assert len(predictions) == 3 and all(p.sequence and p.token_str for p in predictions)
    tagger = start_server("--model", str(task_models["token-classification"]))
    text = "sarah lives in paris"
    entities = hf(tagger).token_classification(text, aggregation_strategy="simple")
    # What transformers' own pipeline answers (in the dtype the server chose); not nothing.
    reference = pipeline("token-classification", model=str(task_models["token-classification"]),
                         dtype=getattr(torch, tagger.info()["dtype"]), device="cpu")
    expected = reference(text, aggregation_strategy="simple")
    assert expected and all(entity.entity_group in ("PER", "LOC") for entity in entities)
    assert [(e.entity_group, e.word, e.start, e.end) for e in entities] == \
        [(e["entity_group"], e["word"], e["start"], e["end"]) for e in expected]
    assert [e.score for e in entities] == pytest.approx([float(e["score"]) for e in expected], rel=1e-4)


def test_inference_client_zero_shot(start_server: Any, task_models: dict[str, Path]) -> None:
    client = hf(start_server("--model", str(task_models["zero-shot-classification"]), "--task", "zero-shot-classification"))
    labels = client.zero_shot_classification("i love this film", candidate_labels=["happy", "sad", "city"])
    assert sorted(item.label for item in labels) == ["city", "happy", "sad"]
    assert labels[0].score >= labels[-1].score and abs(sum(item.score for item in labels) - 1) < 1e-4


def test_inference_client_text_generation(start_server: Any, task_models: dict[str, Path]) -> None:
    client = hf(start_server("--model", str(task_models["text-generation"])))
    text = client.text_generation("the good movie", max_new_tokens=4, do_sample=False)
    assert isinstance(text, str) and 1 <= len(text.split()) <= 4
    assert not text.startswith("the good movie")  # the continuation only, as TGI answers


def test_inference_client_image_and_audio_classification(start_server: Any, task_models: dict[str, Path]) -> None:
    image = hf(start_server("--model", str(task_models["image-classification"])))
    labels = image.image_classification(png_bytes())  # raw bytes, no Content-Type
    assert {item.label for item in labels} <= {"cat", "dog", "bird"} and labels
    one = image.image_classification(png_bytes(), top_k=1)  # now JSON with base64 inputs
    assert len(one) == 1
    audio = hf(start_server("--model", str(task_models["audio-classification"])))
    sounds = audio.audio_classification(wav_bytes(), top_k=2)
    assert sorted(item.label for item in sounds) == ["no", "yes"]


# --- openai SDK and LangChain ------------------------------------------------------------------


def _openai(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


def test_openai_embeddings_default_base64_float_and_dimensions(embedder: Server) -> None:
    client = _openai(embedder)
    default = client.embeddings.create(model="anything", input=["hello world", "a second text"])
    assert default.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert [item.index for item in default.data] == [0, 1] and len(default.data[0].embedding) == 384
    assert default.usage.prompt_tokens == default.usage.total_tokens == 4 + 5  # [CLS] ... [SEP]
    floats = client.embeddings.create(model="m", input="hello world", encoding_format="float")
    assert floats.usage.prompt_tokens == 4  # alone: [CLS] hello world [SEP]
    assert np.allclose(floats.data[0].embedding, default.data[0].embedding, atol=1e-6)
    raw = client.embeddings.create(model="m", input="hello world", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    short = client.embeddings.create(model="m", input="hello world", dimensions=16, encoding_format="float")
    assert len(short.data[0].embedding) == 16
    assert abs(float(np.linalg.norm(short.data[0].embedding)) - 1) < 1e-4


def test_openai_errors_use_the_openai_envelope(embedder: Server, classifier: Server) -> None:
    import openai

    client = _openai(embedder)
    with pytest.raises(openai.BadRequestError) as token_ids:
        client.embeddings.create(model="m", input=[[1, 2, 3]])
    assert "token ids" in token_ids.value.message and token_ids.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="'dimensions' must be an integer from 1 to 384"):
        client.embeddings.create(model="m", input="x", dimensions=1000)
    with pytest.raises(openai.BadRequestError, match="needs a feature-extraction model"):
        _openai(classifier).embeddings.create(model="m", input="x")
    models = client.models.list()
    assert [model.id for model in models.data] == ["sentence-transformers/all-MiniLM-L6-v2"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_langchain_embeds_a_thousand_documents_in_one_request(embedder: Server) -> None:
    from langchain_openai import OpenAIEmbeddings

    texts = [f"document number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(1000)]
    embeddings = OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"http://127.0.0.1:{embedder.port}/v1",
                                  api_key="unused", check_embedding_ctx_length=False, max_retries=0)  # type: ignore[call-arg]
    vectors = embeddings.embed_documents(texts)
    assert len(vectors) == 1000 and {len(vector) for vector in vectors} == {384}
    assert np.allclose(vectors[0], embeddings.embed_query(texts[0]), atol=1e-5)
    counters = embedder.info()["counters"]
    assert counters["refused"] == {}  # entered in windows: never more than the queue holds


# --- TEI routes, against TEI's OpenAPI document ---------------------------------------------------


def _post(server: Server, path: str, document: Any) -> Any:
    reply = server.request("POST", path, json.dumps(document), {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    return reply.json()


def test_tei_embedding_routes(embedder: Server) -> None:
    one = _post(embedder, "/embed", {"inputs": "hello"})
    assert_tei_shape(one, "EmbedResponse")
    assert len(one) == 1 and len(one[0]) == 384  # always 2-D
    two = _post(embedder, "/embed", {"inputs": ["hello", "world"], "normalize": False, "dimensions": 8})
    assert len(two) == 2 and len(two[0]) == 8
    tokens = _post(embedder, "/embed_all", {"inputs": ["hello there"]})
    assert_tei_shape(tokens, "EmbedAllResponse")
    assert len(tokens[0]) == 4 and len(tokens[0][0]) == 384  # [CLS] hello there [SEP]
    assert_tei_shape(_post(embedder, "/v1/embeddings", {"input": "hello"}), "OpenAICompatResponse")


def test_tei_tokenize_and_decode(embedder: Server) -> None:
    tokens = _post(embedder, "/tokenize", {"inputs": "hello there"})
    assert_tei_shape(tokens, "TokenizeResponse")
    assert [t["text"] for t in tokens[0]] == ["[CLS]", "hello", "there", "[SEP]"]
    assert tokens[0][1] == {"id": tokens[0][1]["id"], "text": "hello", "special": False, "start": 0, "stop": 5}
    texts = _post(embedder, "/decode", {"ids": [token["id"] for token in tokens[0]]})
    assert_tei_shape(texts, "DecodeResponse")
    assert texts == ["hello there"]
    bad = embedder.request("POST", "/decode", json.dumps({"ids": [10**9]}), {"Content-Type": "application/json"})
    assert bad.status == 400 and bad.json()["error_type"] == "validation"


def test_tei_predict_single_pair_and_batch(classifier: Server) -> None:
    single = _post(classifier, "/predict", {"inputs": "a good movie"})
    assert_tei_shape(single, "PredictResponse")
    assert sorted(p["label"] for p in single) == ["NEGATIVE", "POSITIVE"]
    assert single[0]["score"] >= single[1]["score"] and abs(sum(p["score"] for p in single) - 1) < 1e-4
    pair = _post(classifier, "/predict", {"inputs": ["a good movie", "a bad film"]})
    assert len(pair) == 2 and pair != single
    batch = _post(classifier, "/predict", {"inputs": [["a good movie"], ["a good movie", "a bad film"]],
                                           "raw_scores": True})
    assert_tei_shape(batch, "PredictResponse")
    assert len(batch) == 2 and abs(sum(p["score"] for p in batch[0]) - 1) > 1e-6
    wrong = classifier.request("POST", "/rerank", json.dumps({"query": "q", "texts": ["t"]}),
                               {"Content-Type": "application/json"})
    assert wrong.status == 400 and "needs a reranker" in wrong.json()["error"]


def test_tei_rerank_sorted_with_text_and_raw_scores(reranker: Server) -> None:
    texts = ["the cat", "a dog is happy", "paris is the capital of france", "no"]
    ranked = _post(reranker, "/rerank", {"query": "what is the capital of france", "texts": texts,
                                         "return_text": True})
    assert_tei_shape(ranked, "RerankResponse")
    assert sorted(entry["index"] for entry in ranked) == [0, 1, 2, 3]
    assert [entry["score"] for entry in ranked] == sorted((entry["score"] for entry in ranked), reverse=True)
    assert all(entry["text"] == texts[entry["index"]] and 0 < entry["score"] < 1 for entry in ranked)
    raw = _post(reranker, "/rerank", {"query": "what is the capital of france", "texts": texts, "raw_scores": True})
    sigmoid = {entry["index"]: 1 / (1 + np.exp(-entry["score"])) for entry in raw}
    assert all(abs(sigmoid[entry["index"]] - entry["score"]) < 1e-5 for entry in ranked)
    assert "text" not in raw[0]


def test_tei_errors_use_the_tei_envelope(embedder: Server) -> None:
    reply = embedder.request("POST", "/embed", json.dumps({"inputs": []}), {"Content-Type": "application/json"})
    assert reply.status == 400
    assert set(reply.json()) == {"error", "error_type"} and reply.json()["error_type"] == "validation"
    wrong_task = embedder.request("POST", "/predict", json.dumps({"inputs": "x"}), {"Content-Type": "application/json"})
    assert wrong_task.status == 400 and "needs a text-classification model" in wrong_task.json()["error"]
