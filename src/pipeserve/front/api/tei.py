"""The text-embeddings-inference dialect: /embed, /embed_all, /predict, /rerank, /tokenize,
/decode, and TEI's fields in /info. Errors answer in TEI's envelope ({"error", "error_type"}).

Shapes follow TEI's router: /embed is always 2-D, /predict flat for one input and nested for a
batch, /rerank sorted by score. Token-id inputs are refused with a 400; statuses are
pipeserve's own (400, 413, 503 + Retry-After where TEI answers 422, 413 and 429).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
from aiohttp import web

from pipeserve import __version__
from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.api.contract import (
    FACT_KEY,
    Answer,
    Body,
    Dimensions,
    PromptName,
    Texts,
    TokenId,
    TruncationDirection,
    decode,
    taken,
    truncation_direction,
)
from pipeserve.front.api.routes import Dialect, Route
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import Runtime
from pipeserve.ipc import CLASSIFICATION_TASK, EMBEDDING_TASK, Op, Ready


class TeiError(Answer):
    error: str
    error_type: str


# text-embeddings-inference's error_type names, lower-cased as huggingface_hub matches them.
_TEI_TYPES = {400: "validation", 401: "unauthorized", 404: "validation", 405: "validation",
              408: "validation", 413: "validation", 503: "overloaded", 504: "backend"}


def tei_body(error: errors.PipeserveError) -> dict[str, object]:
    return {"error": error.message, "error_type": _TEI_TYPES.get(error.status, "backend")}


DIALECT = Dialect("tei", tei_body, TeiError)


class Truncated(Body):
    truncate: Annotated[bool, taken("truncation")] | None = None
    truncation_direction: Annotated[TruncationDirection, taken("truncation_direction")] | None = None


class EmbedRequest(Truncated, kw_only=True):
    inputs: Texts
    normalize: bool | None = None
    prompt_name: PromptName | None = None
    dimensions: Dimensions | None = None


class EmbedAllRequest(Truncated, kw_only=True):
    inputs: Texts
    prompt_name: PromptName | None = None


# A text, or a list of one text or of a text pair; /predict takes one or a list of them.
Sequence = Annotated[list[str], msgspec.Meta(min_length=1, max_length=2)]
_SEQUENCE = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2}


class PredictRequest(Truncated, kw_only=True):
    inputs: str | Annotated[list[str | Sequence], msgspec.Meta(min_length=1)]
    raw_scores: bool | None = None
    exact: ClassVar = {"inputs": {"anyOf": [{"type": "string"}, _SEQUENCE,
                                            {"type": "array", "items": _SEQUENCE, "minItems": 1}]}}


class RerankRequest(Truncated, kw_only=True):
    query: str
    texts: Annotated[list[str], msgspec.Meta(min_length=1)]
    raw_scores: bool | None = None
    return_text: bool | None = None


class TokenizeRequest(Body):
    inputs: Texts
    add_special_tokens: bool | None = None


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, FACT_KEY: "token_id"}, "minItems": 1}


class DecodeRequest(Body):
    ids: Annotated[list[TokenId | Annotated[list[TokenId], msgspec.Meta(min_length=1)]], msgspec.Meta(min_length=1)]
    skip_special_tokens: bool | None = None
    exact: ClassVar = {"ids": {"anyOf": [_IDS, {"type": "array", "items": _IDS, "minItems": 1}]}}


class Prediction(Answer):
    score: float
    label: str


class Ranked(Answer):
    index: int
    score: float
    text: str | None = None


class TokenInfo(Answer):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def _truncation(document: Truncated) -> dict[str, Any]:
    wanted = {"truncation": document.truncate, "truncation_direction": truncation_direction(
        document.truncation_direction)}
    return {name: value for name, value in wanted.items() if value is not None}


def sentence_pooling(ready: Ready) -> str:
    """How a sentence vector is pooled: the model's own, or mean over its tokens where it has
    none (a bare transformer), as TEI and OpenAI's embeddings answer one vector per text."""
    pooling = ready.details.get("pooling") or "none"
    return "mean" if pooling == "none" else str(pooling)


async def embed(request: web.Request) -> web.Response:
    model = await common.serving_model(request)
    document = decode(await common.read_body(request), EmbedRequest)
    parameters = {"pooling": sentence_pooling(model.ready),
                  "normalize": True if document.normalize is None else document.normalize, **_truncation(document)}
    for name, value in (("prompt_name", document.prompt_name), ("dimensions", document.dimensions)):
        if value is not None:
            parameters[name] = value
    jobs = await common.run_jobs(request, model, _texts(document.inputs), parameters)
    return json_response(common.results(jobs))  # always 2-D, one vector per input


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


async def embed_all(request: web.Request) -> web.Response:
    model = await common.serving_model(request)
    document = decode(await common.read_body(request), EmbedAllRequest)
    parameters = {"pooling": "none", "normalize": False, **_truncation(document)}
    if document.prompt_name is not None:
        parameters["prompt_name"] = document.prompt_name
    jobs = await common.run_jobs(request, model, _texts(document.inputs), parameters)
    return json_response([tokens[0] for tokens in common.results(jobs)])  # [1, T, H] -> [T, H]


def _classifier_parameters(document: PredictRequest | RerankRequest, function: str) -> dict[str, Any]:
    return {"top_k": None, "function_to_apply": "none" if document.raw_scores else function, **_truncation(document)}


def _sequence(value: str | list[str]) -> Any:
    """One /predict input: a text, or a list of one text or of a text pair."""
    if isinstance(value, str):
        return value
    return value[0] if len(value) == 1 else {"text": value[0], "text_pair": value[1]}


def _predict_inputs(value: str | list[Any]) -> tuple[list[Any], bool]:
    """(inputs, batch): one sequence, or a list of them; a list that mixes the two is refused."""
    if isinstance(value, str) or all(isinstance(item, str) for item in value):
        if isinstance(value, list) and len(value) > 2:
            raise errors.BadRequest('"inputs": a list of texts is one text or a text pair; a batch is a list '
                                    'of such lists', param="inputs")
        return [_sequence(value)], False
    if not all(isinstance(item, list) for item in value):
        raise errors.BadRequest('"inputs": a batch is a list of lists (each a text or a text pair)', param="inputs")
    return [_sequence(item) for item in value], True


async def predict(request: web.Request) -> web.Response:
    model = await common.serving_model(request)
    document = decode(await common.read_body(request), PredictRequest)
    items, batch = _predict_inputs(document.inputs)
    # The pipeline's default: softmax over several labels, sigmoid for one (as TEI does).
    parameters = _classifier_parameters(document, "softmax" if len(model.ready.details.get("labels", [])) > 1
                                        else "sigmoid")
    jobs = await common.run_jobs(request, model, items, parameters)
    answers = common.results(jobs)
    return json_response(answers if batch else answers[0])


def is_reranker(ready: Ready) -> str | None:
    labels = ready.details.get("labels", [])
    if len(labels) == 1:
        return None
    return (f"/rerank needs a reranker (a text-classification model with one output, num_labels=1); "
            f"this model has {len(labels)} labels: use /predict")


async def rerank(request: web.Request) -> web.Response:
    model = await common.serving_model(request)
    document = decode(await common.read_body(request), RerankRequest)
    pairs = [{"text": document.query, "text_pair": text} for text in document.texts]
    jobs = await common.run_jobs(request, model, pairs, _classifier_parameters(document, "sigmoid"))
    ranked = []
    for index, (text, scores) in enumerate(zip(document.texts, common.results(jobs), strict=True)):
        entry: dict[str, Any] = {"index": index, "score": scores[0]["score"]}
        if document.return_text:
            entry["text"] = text
        ranked.append(entry)
    return json_response(sorted(ranked, key=lambda entry: -entry["score"]))


async def tokenize(request: web.Request) -> web.Response:
    model = await common.serving_model(request)
    document = decode(await common.read_body(request), TokenizeRequest)
    add_special = True if document.add_special_tokens is None else document.add_special_tokens
    jobs = await common.run_jobs(request, model, _texts(document.inputs), {"add_special_tokens": add_special},
                                 Op.TOKENIZE)
    return json_response(common.results(jobs))  # always nested, one token list per input


async def decode_ids(request: web.Request) -> web.Response:
    model = await common.serving_model(request)
    document = decode(await common.read_body(request), DecodeRequest)
    ids = document.ids
    if all(isinstance(item, int) for item in ids):
        sequences: list[Any] = [ids]
    elif all(isinstance(item, list) for item in ids):
        sequences = ids
    else:
        raise errors.BadRequest('"ids" must be a list of token ids, or a list of such lists', param="ids")
    skip = True if document.skip_special_tokens is None else document.skip_special_tokens
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


Vectors = list[list[float]]
ROUTES = (
    Route("POST", "/embed", embed, "Sentence embeddings, one vector per input (TEI)", DIALECT,
          request=EmbedRequest, response=Vectors, tasks=(EMBEDDING_TASK,),
          examples=({"inputs": ["What is deep learning?", "A cat sat on the mat."]},)),
    Route("POST", "/embed_all", embed_all, "Token embeddings, a matrix per input (TEI)", DIALECT,
          request=EmbedAllRequest, response=list[Vectors], tasks=(EMBEDDING_TASK,),
          examples=({"inputs": "What is deep learning?"},)),
    Route("POST", "/predict", predict, "Classify a text or a text pair, or a batch of them (TEI)", DIALECT,
          request=PredictRequest, response=list[Prediction | list[Prediction]], tasks=(CLASSIFICATION_TASK,),
          examples=({"inputs": "I like you."}, {"inputs": [["I like you."], ["I hate you."]]})),
    Route("POST", "/rerank", rerank, "Rank texts against a query with a cross-encoder (TEI)", DIALECT,
          request=RerankRequest, response=list[Ranked], tasks=(CLASSIFICATION_TASK,), requires=is_reranker,
          examples=({"query": "What is deep learning?", "texts": ["Deep learning is...", "Cheese is..."]},)),
    Route("POST", "/tokenize", tokenize, "Tokens of each text (TEI)", DIALECT,
          request=TokenizeRequest, response=list[list[TokenInfo]], examples=({"inputs": "test"},)),
    Route("POST", "/decode", decode_ids, "Text of each token-id list (TEI)", DIALECT,
          request=DecodeRequest, response=list[str], examples=({"ids": [1, 2, 3]},)),
)
