"""The OpenAI API dialect: `POST /v1/embeddings`, `GET /v1/models` (errors in OpenAI's envelope).

The openai SDK asks for base64 by default (little-endian float32, which it decodes); LangChain's
OpenAIEmbeddings goes through the SDK. Vectors are the model's sentence embedding, normalised, as
OpenAI's are; `dimensions` keeps the first N values and re-normalises (Matryoshka models).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.api.routes import Route, json_type, obj, parse_object
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import RUNTIME

ENCODING_FORMATS = ("float", "base64")
_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}}
EMBEDDINGS_REQUEST = obj({
    "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        {**_TOKEN_IDS, "description": "refused: token ids are not served"},
                        {"type": "array", "items": _TOKEN_IDS, "description": "refused"}]},
    "model": {"type": "string", "description": "any name: the served model answers"},
    "encoding_format": {"type": "string", "enum": list(ENCODING_FORMATS)},
    "dimensions": {"type": "integer", "minimum": 1},
    "user": {"type": "string"},
}, required=["input"])
EMBEDDINGS_RESPONSE = obj({
    "object": {"type": "string", "enum": ["list"]},
    "data": {"type": "array", "items": obj({
        "object": {"type": "string", "enum": ["embedding"]},
        "index": {"type": "integer", "minimum": 0},
        "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]},
    }, required=["object", "index", "embedding"])},
    "model": {"type": "string"},
    "usage": obj({"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
                 required=["prompt_tokens", "total_tokens"]),
}, required=["object", "data", "model", "usage"])
MODEL_CARD = obj({"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                  "created": {"type": "integer"}, "owned_by": {"type": "string"}},
                 required=["id", "object", "created", "owned_by"])


async def embeddings(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    common.require_task(model, "/v1/embeddings", "feature-extraction")
    document = parse_object(await common.read_body(request), EMBEDDINGS_REQUEST)
    texts = embedding_inputs(document.get("input"))
    encoding = document.get("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        raise errors.BadRequest(f'"encoding_format" must be one of {", ".join(ENCODING_FORMATS)}')
    pooling = model.ready.details.get("pooling") or "none"
    parameters: dict[str, Any] = {"pooling": "mean" if pooling == "none" else pooling, "normalize": True}
    if document.get("dimensions") is not None:
        parameters["dimensions"] = document["dimensions"]
    jobs = await common.run_jobs(request, model, texts, parameters)
    data = [{"object": "embedding", "index": index, "embedding": _encode(job.future.result(), encoding)}
            for index, job in enumerate(jobs)]
    tokens = sum(job.token_count or 0 for job in jobs)
    return json_response({"object": "list", "data": data, "model": request.app[RUNTIME].served_model_name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def embedding_inputs(value: Any) -> list[str]:
    """The texts of `input`: a string or a list of strings. Token ids are refused clearly."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise errors.BadRequest(f'"input" must be a string or a list of strings, not {json_type(value)}')
    if not value:
        raise errors.BadRequest('"input" is an empty list')
    if all(isinstance(item, int) for item in value) or all(isinstance(item, list) for item in value):
        raise errors.BadRequest('"input" as token ids is not served: send the texts (with LangChain\'s '
                                "OpenAIEmbeddings, set check_embedding_ctx_length=False)")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise errors.BadRequest(f'"input"[{index}] must be a string, not {json_type(item)}')
    return value


def _encode(vector: Any, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _model_card(request: web.Request) -> dict[str, Any]:
    runtime = request.app[RUNTIME]
    return {"id": runtime.served_model_name, "object": "model", "created": int(runtime.started_at),
            "owned_by": "pipeserve"}


async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_card(request)]})


async def get_model(request: web.Request) -> web.Response:
    card = _model_card(request)
    if request.match_info["model"] != card["id"]:
        raise errors.NotFound(f"model {request.match_info['model']!r} is not served here; "
                              f"this server serves {card['id']!r}")
    return json_response(card)


ROUTES = (
    Route("POST", "/v1/embeddings", embeddings, "Embeddings (OpenAI)", "openai",
          request=EMBEDDINGS_REQUEST, response=EMBEDDINGS_RESPONSE),
    Route("GET", "/v1/models", list_models, "The served model (OpenAI)", "openai",
          response=obj({"object": {"type": "string", "enum": ["list"]},
                        "data": {"type": "array", "items": MODEL_CARD}}, required=["object", "data"])),
    Route("GET", "/v1/models/{model:.+}", get_model, "One model by name (OpenAI)", "openai",
          response=MODEL_CARD),
)


