"""The OpenAI API dialect: `POST /v1/embeddings`, `GET /v1/models` (errors in OpenAI's envelope).

The openai SDK asks for base64 by default (little-endian float32, which it decodes); LangChain's
OpenAIEmbeddings goes through the SDK. Vectors are the model's sentence embedding, normalised, as
OpenAI's are; `dimensions` keeps the first N values and re-normalises (Matryoshka models).
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from pipeserve import ipc
from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.api.routes import Route, Schema, json_type, obj, parse_object, texts
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import RUNTIME
from pipeserve.front.streams import Stream
from pipeserve.ipc import EMBEDDING_TASK, GENERATION_TASK

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
    document = parse_object(await common.read_body(request), EMBEDDINGS_REQUEST)
    inputs, _ = texts(document.get("input"), "input", hint=" (with LangChain's OpenAIEmbeddings, set "
                                                           "check_embedding_ctx_length=False)")
    encoding = document.get("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        raise errors.BadRequest(f'"encoding_format" must be one of {", ".join(ENCODING_FORMATS)}')
    pooling = model.ready.details.get("pooling") or "none"
    parameters: dict[str, Any] = {"pooling": "mean" if pooling == "none" else pooling, "normalize": True}
    if document.get("dimensions") is not None:
        parameters["dimensions"] = document["dimensions"]
    jobs = await common.run_jobs(request, model, inputs, parameters)
    data = [{"object": "embedding", "index": index, "embedding": _encode(job.future.result(), encoding)}
            for index, job in enumerate(jobs)]
    tokens = sum(job.token_count or 0 for job in jobs)
    return json_response({"object": "list", "data": data, "model": request.app[RUNTIME].served_model_name,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


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
          request=EMBEDDINGS_REQUEST, response=EMBEDDINGS_RESPONSE, tasks=(EMBEDDING_TASK,)),
    Route("GET", "/v1/models", list_models, "The served model (OpenAI)", "openai",
          response=obj({"object": {"type": "string", "enum": ["list"]},
                        "data": {"type": "array", "items": MODEL_CARD}}, required=["object", "data"])),
    Route("GET", "/v1/models/{model:.+}", get_model, "One model by name (OpenAI)", "openai",
          response=MODEL_CARD),
)




# --- completions and chat completions ---------------------------------------------------------------

_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}]}
_SAMPLING: dict[str, Schema] = {
    "model": {"type": "string"}, "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": common.TEMPERATURE_MAX},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "stop": _STOP, "seed": {"type": ["integer", "null"], "minimum": 0},
    "n": {"type": ["integer", "null"], "enum": [1, None]},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"}, "ignore_eos": {"type": "boolean"},
    "presence_penalty": {"type": ["number", "null"], "enum": [0, None]},
    "frequency_penalty": {"type": ["number", "null"], "enum": [0, None]},
    "logprobs": {"type": ["boolean", "integer", "null"], "enum": [False, None]},
}
COMPLETIONS_REQUEST = obj({**_SAMPLING, "prompt": {"oneOf": [{"type": "string"}, {
    "type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]},
    "echo": {"type": "boolean", "enum": [False]}}, required=["prompt"])
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "developer"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}
CHAT_REQUEST = obj({**_SAMPLING, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1}}, required=["messages"])
_USAGE = obj({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
              "total_tokens": {"type": "integer"}}, required=["prompt_tokens", "completion_tokens", "total_tokens"])
COMPLETION_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                       "properties": {"object": {"type": "string", "enum": ["text_completion"]}, "usage": _USAGE}}
CHAT_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                 "properties": {"object": {"type": "string", "enum": ["chat.completion"]}, "usage": _USAGE}}


def _sampling(document: dict[str, Any], max_tokens: Any, limit: int) -> dict[str, Any]:
    if document.get("n") not in (None, 1):
        raise errors.BadRequest('"n" must be 1: one choice per request is served')
    for name in ("presence_penalty", "frequency_penalty"):
        if document.get(name) not in (None, 0):
            raise errors.BadRequest(f'"{name}" is not supported (only 0)')
    if document.get("logprobs") not in (None, False):
        raise errors.BadRequest('"logprobs" is not supported')
    temperature = document.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise errors.BadRequest('"temperature" must be a number')  # its bounds: common.generation_parameters
    wanted = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": document.get("top_p"),
              "seed": document.get("seed"), "stop": document.get("stop"), "ignore_eos": document.get("ignore_eos"),
              # OpenAI samples at temperature 1 by default; 0 is greedy.
              "do_sample": (1.0 if temperature is None else temperature) > 0}
    return common.generation_parameters(wanted, limit)


def _stream_options(document: dict[str, Any]) -> bool:
    options = document.get("stream_options") or {}
    if not isinstance(options, dict):
        raise errors.BadRequest('"stream_options" must be an object')
    return options.get("include_usage") is True


def _messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages with text content (a string, or a list of {"type": "text", "text"} parts)."""
    messages = []
    for index, message in enumerate(value):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise errors.BadRequest(f'"messages"[{index}]: only text content parts are served')
            content = "".join(str(p) for p in parts)
        if not isinstance(message, dict) or not isinstance(content, str) or not isinstance(message.get("role"), str):
            raise errors.BadRequest(f'"messages"[{index}] must have a string "role" and text "content"')
        messages.append({"role": message["role"], "content": content})
    return messages


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """OpenAI answers the text before a stop sequence, without it."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[:min(cuts)] if cuts else text


def _finish(end: ipc.StreamEnd) -> str:
    return "length" if end.finish_reason == "length" else "stop"


def _usage(end: ipc.StreamEnd) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.generated_tokens,
            "total_tokens": end.prompt_tokens + end.generated_tokens}


async def completions(request: web.Request) -> web.StreamResponse:
    document = parse_object(await common.read_body(request), COMPLETIONS_REQUEST)
    prompt = document["prompt"]
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise errors.BadRequest('"prompt" must be a string or a list of one string')
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise errors.BadRequest(f'"prompt" must be a string, not {json_type(prompt)}')
    parameters = _sampling(document, document.get("max_tokens"), request.app[RUNTIME].config.max_new_tokens)
    return await _respond(request, "text_completion", parameters, document, prompt=prompt)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    model = common.serving_model(request)
    if not model.ready.details.get("chat_template"):
        raise errors.BadRequest("this model has no chat template: use /v1/completions")
    document = parse_object(await common.read_body(request), CHAT_REQUEST)
    if not isinstance(document["messages"], list) or not document["messages"]:
        raise errors.BadRequest('"messages" must be a non-empty list')
    messages = _messages(document["messages"])
    max_tokens = document.get("max_completion_tokens") or document.get("max_tokens")
    parameters = _sampling(document, max_tokens, request.app[RUNTIME].config.max_new_tokens)
    return await _respond(request, "chat.completion", parameters, document, messages=messages)


async def _respond(request: web.Request, kind: str, parameters: dict[str, Any], document: dict[str, Any],
                   prompt: str | None = None, messages: list[dict[str, Any]] | None = None) -> web.StreamResponse:
    include_usage = _stream_options(document)
    head = {"id": f"{'chatcmpl' if messages is not None else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": request.app[RUNTIME].served_model_name}
    stops = parameters.get("stop") or []
    async with common.generation(request, prompt, parameters, messages) as stream:
        if document.get("stream"):
            return await _stream(request, stream, head, kind, stops, include_usage, chat=messages is not None)
        tokens, end = await common.collect(request, stream)
    text = _cut_at_stop("".join(token.text for token in tokens), stops)
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(end), "logprobs": None}
    if messages is not None:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return json_response({**head, "object": kind, "choices": [choice], "usage": _usage(end)})


async def _stream(request: web.Request, stream: Stream, head: dict[str, Any], kind: str, stops: list[str],
                  include_usage: bool, chat: bool) -> web.StreamResponse:
    chunk_kind = "chat.completion.chunk" if chat else kind
    deadline = common.generation_deadline(request)
    response = await common.open_event_stream(request, stream, deadline)

    async def send(delta: str | None, finish: str | None, role: bool = False) -> None:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if role else
                               {"content": delta} if delta is not None else {})
        else:
            choice["text"] = delta or ""
        await common.send_event(response, orjson.dumps({**head, "object": chunk_kind, "choices": [choice]}))

    if chat:
        await send(None, None, role=True)
    sent = ""
    async for event in request.app[RUNTIME].streams.events(stream, deadline):
        if event.error is not None:
            await common.send_event(response, orjson.dumps(errors.openai_body(event.error.status, event.error.message)))
            break
        if event.token is not None:
            text = _cut_at_stop(sent + event.token.text, stops)
            if len(text) > len(sent):
                await send(text[len(sent):], None)
                sent = text
        if event.end is not None and event.end.finish_reason != "cancelled":
            await send(None, _finish(event.end))
            if include_usage:
                await common.send_event(response, orjson.dumps({**head, "object": chunk_kind, "choices": [],
                                                                "usage": _usage(event.end)}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


GENERATION_ROUTES = (
    Route("POST", "/v1/completions", completions, "Text completions (OpenAI), plain or streamed", "openai",
          request=COMPLETIONS_REQUEST, response=COMPLETION_RESPONSE, tasks=(GENERATION_TASK,)),
    Route("POST", "/v1/chat/completions", chat_completions, "Chat completions (OpenAI), plain or streamed",
          "openai", request=CHAT_REQUEST, response=CHAT_RESPONSE, tasks=(GENERATION_TASK,)),
)
