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
from pipeserve.front.api.hf import json_type, load_json_object
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import RUNTIME

EMBEDDING_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})
ENCODING_FORMATS = ("float", "base64")


async def embeddings(request: web.Request) -> web.Response:
    model = common.serving_model(request)
    common.require_task(model, "/v1/embeddings", "feature-extraction")
    document = load_json_object(await request.read(), '{"input": ..., "model": ...}')
    unknown = sorted(set(document) - EMBEDDING_FIELDS)
    if unknown:
        raise errors.BadRequest(f"unknown field {unknown[0]!r}; expected {', '.join(sorted(EMBEDDING_FIELDS))}")
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


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)


