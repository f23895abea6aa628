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
from pipeserve.front.api import common
from pipeserve.front.api.hf import json_type, load_json_object
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import LoadedModel, Runtime
from pipeserve.ipc import Op

PATHS = frozenset({"/embed", "/embed_all", "/predict", "/rerank", "/tokenize", "/decode"})
_TRUNCATION = {"truncate": "truncation", "truncation_direction": "truncation_direction"}


def _document(body: bytes, allowed: frozenset[str], required: str) -> dict[str, Any]:
    document = load_json_object(body, f'{{"{required}": ...}}')
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise errors.BadRequest(f"unknown field {unknown[0]!r}; expected {', '.join(sorted(allowed))}")
    if required not in document:
        raise errors.BadRequest(f'missing "{required}"')
    return document


def _texts(value: Any, field: str = "inputs") -> tuple[list[str], bool]:
    """(texts, single) from a string or a non-empty list of strings; token ids are refused."""
    if isinstance(value, str):
        return [value], True
    if not isinstance(value, list) or not value:
        raise errors.BadRequest(f'"{field}" must be a string or a non-empty list of strings, not {json_type(value)}')
    for index, item in enumerate(value):
        if isinstance(item, (int, list)):
            raise errors.BadRequest(f'"{field}" as token ids is not served: send the texts')
        if not isinstance(item, str):
            raise errors.BadRequest(f'"{field}"[{index}] must be a string, not {json_type(item)}')
    return value, False


def _truncation(document: dict[str, Any]) -> dict[str, Any]:
    return {name: document[field] for field, name in _TRUNCATION.items() if document.get(field) is not None}


def _pooling(model: LoadedModel) -> str:
    pooling = model.ready.details.get("pooling") or "none"
    return "mean" if pooling == "none" else str(pooling)


_EMBED_FIELDS = frozenset({"inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "dimensions"})


async def embed(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    common.require_task(model, "/embed", "feature-extraction")
    document = _document(await request.read(), _EMBED_FIELDS, "inputs")
    texts, _ = _texts(document["inputs"])
    parameters = {"pooling": _pooling(model), "normalize": document.get("normalize", True),
                  **_truncation(document)}
    for name in ("prompt_name", "dimensions"):
        if document.get(name) is not None:
            parameters[name] = document[name]
    jobs = await common.run_jobs(request, model, texts, parameters)
    return json_response(common.results(jobs))  # always 2-D, one vector per input


async def embed_all(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    common.require_task(model, "/embed_all", "feature-extraction")
    document = _document(await request.read(), _EMBED_FIELDS - {"normalize", "dimensions"}, "inputs")
    texts, _ = _texts(document["inputs"])
    parameters = {"pooling": "none", "normalize": False, **_truncation(document)}
    if document.get("prompt_name") is not None:
        parameters["prompt_name"] = document["prompt_name"]
    jobs = await common.run_jobs(request, model, texts, parameters)
    return json_response([tokens[0] for tokens in common.results(jobs)])  # [1, T, H] -> [T, H]


def _classifier_parameters(document: dict[str, Any], function: str) -> dict[str, Any]:
    raw = document.get("raw_scores", False)
    if not isinstance(raw, bool):
        raise errors.BadRequest('"raw_scores" must be true or false')
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
    common.require_task(model, "/predict", "text-classification")
    document = _document(await request.read(), frozenset({"inputs", "raw_scores", *_TRUNCATION}), "inputs")
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


_RERANK_FIELDS = frozenset({"query", "texts", "raw_scores", "return_text", *_TRUNCATION})


async def rerank(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    common.require_task(model, "/rerank", "text-classification")
    labels = model.ready.details.get("labels", [])
    if len(labels) != 1:
        raise errors.BadRequest(f"/rerank needs a reranker (a text-classification model with one output, "
                                f"num_labels=1); this model has {len(labels)} labels: use /predict")
    document = _document(await request.read(), _RERANK_FIELDS, "texts")
    query = document.get("query")
    if not isinstance(query, str):
        raise errors.BadRequest(f'"query" must be a string, not {json_type(query)}')
    texts, _ = _texts(document["texts"], "texts")
    return_text = document.get("return_text", False)
    if not isinstance(return_text, bool):
        raise errors.BadRequest('"return_text" must be true or false')
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
    document = _document(await request.read(), frozenset({"inputs", "add_special_tokens"}), "inputs")
    texts, _ = _texts(document["inputs"])
    add_special = document.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise errors.BadRequest('"add_special_tokens" must be true or false')
    jobs = await common.run_jobs(request, model, texts, {"add_special_tokens": add_special}, Op.TOKENIZE)
    return json_response(common.results(jobs))  # always nested, one token list per input


async def decode(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    document = _document(await request.read(), frozenset({"ids", "skip_special_tokens"}), "ids")
    ids = document["ids"]
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        sequences = [ids]
    elif isinstance(ids, list) and ids and all(
            isinstance(s, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in s) for s in ids):
        sequences = ids
    else:
        raise errors.BadRequest('"ids" must be a non-empty list of token ids, or a list of such lists')
    skip = document.get("skip_special_tokens", True)
    if not isinstance(skip, bool):
        raise errors.BadRequest('"skip_special_tokens" must be true or false')
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
        "max_batch_tokens": config.max_batch_tokens,
        "max_batch_requests": config.max_batch_size,
        "max_client_batch_size": config.max_items,
        "auto_truncate": True,
        "tokenization_workers": config.worker_count(),
        "version": __version__,
    }


def add_routes(app: web.Application) -> None:
    for path, handler in (("/embed", embed), ("/embed_all", embed_all), ("/predict", predict),
                          ("/rerank", rerank), ("/tokenize", tokenize), ("/decode", decode)):
        app.router.add_post(path, handler)
