"""The text-embeddings-inference dialect: /embed, /embed_all, /predict, /rerank, /tokenize,
/decode, and TEI's fields in /info. Errors answer in TEI's envelope ({"error", "error_type"}).

Shapes follow TEI's router: /embed is always 2-D, /predict flat for one input and nested for a
batch, /rerank sorted by score. Token-id inputs are refused with a 400; statuses are
pipeserve's own (400, 413, 503 + Retry-After where TEI answers 422, 413 and 429).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pipeserve import __version__
from pipeserve.front import errors
from pipeserve.front.api import common, routes
from pipeserve.front.api.routes import TEXTS, Route, Schema, boolean, json_type, obj, parse_object
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import LoadedModel, Runtime
from pipeserve.ipc import CLASSIFICATION_TASK, EMBEDDING_TASK, Op

_TRUNCATION = {"truncate": "truncation", "truncation_direction": "truncation_direction"}
_TRUNCATE: dict[str, Schema] = {"truncate": {"type": "boolean"},
             "truncation_direction": {"type": "string", "enum": ["left", "right", "Left", "Right"]}}
_VECTORS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
_PREDICTIONS = {"type": "array", "items": obj({"score": {"type": "number"}, "label": {"type": "string"}},
                                              required=["score", "label"])}
EMBED_REQUEST = obj({"inputs": TEXTS, "normalize": {"type": "boolean"}, "prompt_name": {"type": "string"},
                     "dimensions": {"type": "integer", "minimum": 1}, **_TRUNCATE}, required=["inputs"])
EMBED_ALL_REQUEST = obj({"inputs": TEXTS, "prompt_name": {"type": "string"}, **_TRUNCATE}, required=["inputs"])
_SEQUENCE = {"oneOf": [{"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}]}
PREDICT_REQUEST = obj({"inputs": {"oneOf": [_SEQUENCE, {"type": "array", "items": _SEQUENCE, "minItems": 1}]},
                       "raw_scores": {"type": "boolean"}, **_TRUNCATE}, required=["inputs"])
RERANK_REQUEST = obj({"query": {"type": "string"},
                      "texts": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                      "raw_scores": {"type": "boolean"}, "return_text": {"type": "boolean"}, **_TRUNCATE},
                     required=["query", "texts"])
TOKENIZE_REQUEST = obj({"inputs": TEXTS, "add_special_tokens": {"type": "boolean"}}, required=["inputs"])
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
DECODE_REQUEST = obj({"ids": {"oneOf": [_IDS, {"type": "array", "items": _IDS, "minItems": 1}]},
                      "skip_special_tokens": {"type": "boolean"}}, required=["ids"])
_TOKEN = obj({"id": {"type": "integer"}, "text": {"type": "string"}, "special": {"type": "boolean"},
              "start": {"type": ["integer", "null"]}, "stop": {"type": ["integer", "null"]}},
             required=["id", "text", "special", "start", "stop"])


def _truncation(document: dict[str, Any]) -> dict[str, Any]:
    return {name: document[field] for field, name in _TRUNCATION.items() if document.get(field) is not None}


def _pooling(model: LoadedModel) -> str:
    pooling = model.ready.details.get("pooling") or "none"
    return "mean" if pooling == "none" else str(pooling)


async def embed(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    document = parse_object(await common.read_body(request), EMBED_REQUEST)
    texts, _ = routes.texts(document["inputs"], "inputs")
    parameters = {"pooling": _pooling(model), "normalize": document.get("normalize", True),
                  **_truncation(document)}
    for name in ("prompt_name", "dimensions"):
        if document.get(name) is not None:
            parameters[name] = document[name]
    jobs = await common.run_jobs(request, model, texts, parameters)
    return json_response(common.results(jobs))  # always 2-D, one vector per input


async def embed_all(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    document = parse_object(await common.read_body(request), EMBED_ALL_REQUEST)
    texts, _ = routes.texts(document["inputs"], "inputs")
    parameters = {"pooling": "none", "normalize": False, **_truncation(document)}
    if document.get("prompt_name") is not None:
        parameters["prompt_name"] = document["prompt_name"]
    jobs = await common.run_jobs(request, model, texts, parameters)
    return json_response([tokens[0] for tokens in common.results(jobs)])  # [1, T, H] -> [T, H]


def _classifier_parameters(document: dict[str, Any], function: str) -> dict[str, Any]:
    raw = boolean(document, "raw_scores", False)
    return {"top_k": None, "function_to_apply": "none" if raw else function, **_truncation(document)}


def _sequence(value: Any, where: str) -> Any:
    """One /predict input: a text, or a list of one text or of a text pair."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and 1 <= len(value) <= 2 and all(isinstance(v, str) for v in value):
        return value[0] if len(value) == 1 else {"text": value[0], "text_pair": value[1]}
    raise errors.BadRequest(f"{where} must be a text, or a list of one text or a text pair")


async def predict(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    document = parse_object(await common.read_body(request), PREDICT_REQUEST)
    value = document["inputs"]
    batch = isinstance(value, list) and bool(value) and all(isinstance(item, list) for item in value)
    items = [_sequence(item, f'"inputs"[{i}]') for i, item in enumerate(value)] if batch \
        else [_sequence(value, '"inputs"')]
    # The pipeline's default: softmax over several labels, sigmoid for one (as TEI does).
    parameters = _classifier_parameters(document, "softmax" if len(model.ready.details.get("labels", [])) > 1
                                        else "sigmoid")
    jobs = await common.run_jobs(request, model, items, parameters)
    answers = common.results(jobs)
    return json_response(answers if batch else answers[0])


async def rerank(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    labels = model.ready.details.get("labels", [])
    if len(labels) != 1:
        raise errors.BadRequest(f"/rerank needs a reranker (a text-classification model with one output, "
                                f"num_labels=1); this model has {len(labels)} labels: use /predict")
    document = parse_object(await common.read_body(request), RERANK_REQUEST)
    query = document.get("query")
    if not isinstance(query, str):
        raise errors.BadRequest(f'"query" must be a string, not {json_type(query)}')
    texts, _ = routes.texts(document["texts"], "texts")
    return_text = boolean(document, "return_text", False)
    pairs = [{"text": query, "text_pair": text} for text in texts]
    jobs = await common.run_jobs(request, model, pairs, _classifier_parameters(document, "sigmoid"))
    ranked = []
    for index, (text, scores) in enumerate(zip(texts, common.results(jobs), strict=True)):
        entry: dict[str, Any] = {"index": index, "score": scores[0]["score"]}
        if return_text:
            entry["text"] = text
        ranked.append(entry)
    return json_response(sorted(ranked, key=lambda entry: -entry["score"]))


async def tokenize(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    document = parse_object(await common.read_body(request), TOKENIZE_REQUEST)
    texts, _ = routes.texts(document["inputs"], "inputs")
    add_special = boolean(document, "add_special_tokens", True)
    jobs = await common.run_jobs(request, model, texts, {"add_special_tokens": add_special}, Op.TOKENIZE)
    return json_response(common.results(jobs))  # always nested, one token list per input


async def decode(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    document = parse_object(await common.read_body(request), DECODE_REQUEST)
    ids = document["ids"]
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        sequences = [ids]
    elif isinstance(ids, list) and ids and all(
            isinstance(s, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in s) for s in ids):
        sequences = ids
    else:
        raise errors.BadRequest('"ids" must be a non-empty list of token ids, or a list of such lists')
    skip = boolean(document, "skip_special_tokens", True)
    jobs = await common.run_jobs(request, model, sequences, {"skip_special_tokens": skip}, Op.DECODE)
    return json_response(common.results(jobs))


def info_fields(runtime: Runtime) -> dict[str, Any]:
    """TEI's /info fields, reported beside pipeserve's own."""
    config = runtime.config
    loaded = runtime.loaded_model()
    details = loaded.ready.details if loaded else {}
    model_type: dict[str, Any] | None = None
    if loaded and loaded.ready.task == "feature-extraction":
        model_type = {"embedding": {"pooling": details.get("pooling") or "none"}}
    elif loaded and loaded.ready.task == "text-classification":
        labels = details.get("labels", [])
        kind = "reranker" if len(labels) == 1 else "classifier"
        model_type = {kind: {"id2label": {str(i): label for i, label in enumerate(labels)},
                             "label2id": {label: i for i, label in enumerate(labels)}}}
    return {
        "model_id": runtime.served_model_name,
        "model_sha": None,
        "served_model_name": runtime.served_model_name,
        "model_dtype": loaded.ready.dtype if loaded else config.dtype,
        "model_type": model_type,
        "max_concurrent_requests": config.max_queue,
        "max_input_length": details.get("max_input_length"),
        "max_batch_tokens": config.batch_tokens(),
        "max_batch_requests": config.max_batch_size,
        "max_client_batch_size": config.max_items,
        "auto_truncate": True,
        "tokenization_workers": config.worker_count(),
        "version": __version__,
    }


ROUTES = (
    Route("POST", "/embed", embed, "Sentence embeddings, one vector per input (TEI)", "tei",
          request=EMBED_REQUEST, response=_VECTORS, tasks=(EMBEDDING_TASK,)),
    Route("POST", "/embed_all", embed_all, "Token embeddings, a matrix per input (TEI)", "tei",
          request=EMBED_ALL_REQUEST, response={"type": "array", "items": _VECTORS}, tasks=(EMBEDDING_TASK,)),
    Route("POST", "/predict", predict, "Classify a text or a text pair, or a batch of them (TEI)", "tei",
          request=PREDICT_REQUEST, response={"oneOf": [_PREDICTIONS, {"type": "array", "items": _PREDICTIONS}]},
          tasks=(CLASSIFICATION_TASK,)),
    Route("POST", "/rerank", rerank, "Rank texts against a query with a cross-encoder (TEI)", "tei",
          request=RERANK_REQUEST,
          response={"type": "array", "items": obj({"index": {"type": "integer"}, "score": {"type": "number"},
                                                   "text": {"type": "string"}}, required=["index", "score"])},
          tasks=(CLASSIFICATION_TASK,)),
    Route("POST", "/tokenize", tokenize, "Tokens of each text (TEI)", "tei",
          request=TOKENIZE_REQUEST, response={"type": "array", "items": {"type": "array", "items": _TOKEN}}),
    Route("POST", "/decode", decode, "Text of each token-id list (TEI)", "tei",
          request=DECODE_REQUEST, response={"type": "array", "items": {"type": "string"}}),
)
