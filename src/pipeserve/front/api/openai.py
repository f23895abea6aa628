"""The OpenAI API dialect: `POST /v1/embeddings`, `GET /v1/models` (errors in OpenAI's envelope).

The openai SDK asks for base64 by default (little-endian float32, which it decodes); LangChain's
OpenAIEmbeddings goes through the SDK. Vectors are the model's sentence embedding, normalised, as
OpenAI's are; `dimensions` keeps the first N values and re-normalises (Matryoshka models).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.api.contract import (
    Answer,
    Body,
    Dimensions,
    Texts,
    decode,
    describe,
    fact,
)
from pipeserve.front.api.routes import Dialect, Route
from pipeserve.front.api.tei import sentence_pooling
from pipeserve.front.jsonio import json_response
from pipeserve.front.models import MODELS
from pipeserve.front.runtime import Runtime
from pipeserve.ipc import EMBEDDING_TASK


class ErrorDetail(Answer):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Answer):
    error: ErrorDetail


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
                 504: "timeout_error"}


def openai_body(error: errors.PipeserveError) -> dict[str, object]:
    """OpenAI's: {"error": {"message", "type", "param", "code"}} (the openai SDK reads it)."""
    param = error.param or ("input" if error.index is not None else None)
    return {"error": {"message": error.message, "type": _OPENAI_TYPES.get(error.status, "server_error"),
                      "param": param, "code": error.code}}


DIALECT = Dialect("openai", openai_body, OpenAIError)
AnyModel = Annotated[str, describe("with one model served, any name is it; with several, one of theirs "
                                   "(unknown: 404 model_not_found)"), fact("model_field")]

# --- embeddings and models ---------------------------------------------------------------------------

_TOKEN_IDS_HINT = ("token ids are not served: send the texts (with LangChain's OpenAIEmbeddings, set "
                   "check_embedding_ctx_length=False)")


class EmbeddingsRequest(Body):
    input: Texts
    model: AnyModel | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Dimensions | None = None
    user: str | None = None


class Embedding(Answer):
    object: Literal["embedding"]
    index: int
    embedding: Annotated[list[float] | str, describe("floats, or base64 of little-endian float32")]


class EmbeddingsUsage(Answer):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(Answer):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class ModelCard(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Answer):
    object: Literal["list"]
    data: list[ModelCard]


async def embeddings(request: web.Request) -> web.Response:
    document = decode(await common.read_body(request), EmbeddingsRequest, hints={"input": _TOKEN_IDS_HINT})
    model = await common.serving_model(request, document.model)
    inputs = [document.input] if isinstance(document.input, str) else document.input
    encoding = document.encoding_format or "float"
    parameters: dict[str, Any] = {"pooling": sentence_pooling(model.ready), "normalize": True}
    if document.dimensions is not None:
        parameters["dimensions"] = document.dimensions
    jobs = await common.run_jobs(request, model, inputs, parameters)
    data = [{"object": "embedding", "index": index, "embedding": _encode(job.future.result(), encoding)}
            for index, job in enumerate(jobs)]
    tokens = sum(job.token_count or 0 for job in jobs)
    return json_response({"object": "list", "data": data, "model": common.model_of(request).served_model_name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encode(vector: Any, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _model_card(runtime: Runtime) -> dict[str, Any]:
    return {"id": runtime.name, "object": "model", "created": int(runtime.started_at), "owned_by": "pipeserve"}


async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_card(runtime) for runtime in request.app[MODELS]]})


async def get_model(request: web.Request) -> web.Response:
    return json_response(_model_card(request.app[MODELS].named(request.match_info["model"])))


ROUTES = (
    Route("POST", "/v1/embeddings", embeddings, "Embeddings (OpenAI)", DIALECT,
          request=EmbeddingsRequest, response=EmbeddingsResponse, tasks=(EMBEDDING_TASK,), model_field=True,
          examples=({"input": ["What is deep learning?", "A cat sat on the mat."]},)),
    Route("GET", "/v1/models", list_models, "The served models (OpenAI)", DIALECT, response=ModelList,
          model_route=False),
    Route("GET", "/v1/models/{model:.+}", get_model, "One model by name (OpenAI)", DIALECT, response=ModelCard,
          model_route=False),
)
