"""The text-generation-inference dialect: `POST /generate`, `POST /generate_stream`, and
`POST /` with `"stream": true` (how huggingface_hub's text_generation streams).

Streams are server-sent events, one per token: `{"index", "token": {"id", "text", "logprob",
"special"}, "generated_text", "details", "top_tokens"}`; the last carries `generated_text` and
(when asked) `details`; an error mid-stream is one `{"error", "error_type"}` event. No `[DONE]`.
Errors before the stream starts use TEI/TGI's envelope too.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from pipeserve import ipc
from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.api.routes import ANY_JSON, Route, json_type, obj, parse_object
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import RUNTIME
from pipeserve.front.streams import Stream
from pipeserve.ipc import GENERATION_TASK

# TGI parameters served, by the engine's name for each.
_SERVED = {"max_new_tokens": "max_new_tokens", "do_sample": "do_sample", "temperature": "temperature",
           "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos"}
# Accepted at their neutral value only (huggingface_hub may send them); anything else is a 400.
_NEUTRAL = {"decoder_input_details": False, "watermark": False, "best_of": 1, "top_n_tokens": 0,
            "repetition_penalty": 1.0, "frequency_penalty": 0.0, "typical_p": 1.0, "truncate": None,
            "grammar": None, "adapter_id": None}
PARAMETERS = obj({
    "max_new_tokens": {"type": "integer", "minimum": 1}, "do_sample": {"type": "boolean"},
    "temperature": {"type": "number", "minimum": 0, "maximum": common.TEMPERATURE_MAX},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0}, "seed": {"type": "integer", "minimum": 0},
    "stop": {"type": "array", "items": {"type": "string"}}, "ignore_eos": {"type": "boolean"},
    "details": {"type": "boolean"}, "return_full_text": {"type": "boolean"},
    **{name: {} for name in _NEUTRAL},
})
REQUEST = obj({"inputs": {"type": "string"}, "parameters": PARAMETERS, "stream": {"type": "boolean"}},
              required=["inputs"])
_TOKEN = obj({"id": {"type": "integer"}, "text": {"type": "string"}, "logprob": {"type": "number"},
              "special": {"type": "boolean"}}, required=["id", "text", "logprob", "special"])
_FINISH = {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]}
RESPONSE = obj({"generated_text": {"type": "string"},
                "details": obj({"finish_reason": _FINISH, "generated_tokens": {"type": "integer"},
                                "seed": {"type": ["integer", "null"]}, "prefill": {"type": "array"},
                                "tokens": {"type": "array", "items": _TOKEN}})}, required=["generated_text"])


def parse(document: dict[str, Any], limit: int) -> tuple[str, dict[str, Any], dict[str, bool]]:
    """(prompt, engine parameters, {"details", "return_full_text"}) from a TGI request."""
    prompt = document["inputs"]
    if not isinstance(prompt, str):
        raise errors.BadRequest(f'"inputs" must be a string, not {json_type(prompt)}')
    raw = document.get("parameters") or {}
    if not isinstance(raw, dict):
        raise errors.BadRequest(f'"parameters" must be an object, not {json_type(raw)}')
    unknown = sorted(set(raw) - set(_SERVED) - set(_NEUTRAL) - {"details", "return_full_text"})
    if unknown:
        raise errors.BadRequest(f"unknown parameter {unknown[0]!r}")
    for name, neutral in _NEUTRAL.items():
        if raw.get(name) not in (None, neutral):
            raise errors.BadRequest(f"parameter {name!r} is not supported (only {neutral!r})")
    flags = {}
    for name in ("details", "return_full_text"):
        value = raw.get(name, False)
        if not isinstance(value, bool):
            raise errors.BadRequest(f"parameter {name!r} must be true or false")
        flags[name] = value
    wanted = {engine: raw.get(name) for name, engine in _SERVED.items()}
    # TGI samples when asked to, or when given a sampling knob.
    if wanted.get("do_sample") is None and any(raw.get(k) is not None for k in ("temperature", "top_p", "top_k")):
        wanted["do_sample"] = raw.get("temperature") != 0
    return prompt, common.generation_parameters(wanted, limit), flags


def _details(tokens: list[ipc.Token], end: ipc.StreamEnd, with_tokens: bool) -> dict[str, Any]:
    details: dict[str, Any] = {"finish_reason": end.finish_reason, "generated_tokens": end.generated_tokens,
                               "seed": end.seed}
    if with_tokens:
        details.update(prefill=[], tokens=[_token(t) for t in tokens])
    else:
        details["input_length"] = end.prompt_tokens
    return details


def _token(token: ipc.Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


async def _request(request: web.Request) -> tuple[str, dict[str, Any], dict[str, bool]]:
    document = parse_object(await common.read_body(request), REQUEST)
    return parse(document, request.app[RUNTIME].config.max_new_tokens)


async def generate(request: web.Request) -> web.Response:
    prompt, parameters, flags = await _request(request)
    return json_response(await answer(request, prompt, parameters, flags))


async def answer(request: web.Request, prompt: str, parameters: dict[str, Any],
                 flags: dict[str, bool]) -> dict[str, Any]:
    """The whole generation as TGI's /generate answers it."""
    async with common.generation(request, prompt, parameters) as stream:
        tokens, end = await common.collect(request, stream)
    text = "".join(token.text for token in tokens)
    body: dict[str, Any] = {"generated_text": prompt + text if flags["return_full_text"] else text}
    if flags["details"]:
        body["details"] = _details(tokens, end, with_tokens=True)
    return body


async def generate_stream(request: web.Request) -> web.StreamResponse:
    prompt, parameters, flags = await _request(request)
    return await stream_events(request, prompt, parameters, flags)


async def stream_events(request: web.Request, prompt: str, parameters: dict[str, Any],
                        flags: dict[str, bool]) -> web.StreamResponse:
    """TGI's token events for one generation (a 4xx or 503 comes before the first event)."""
    async with common.generation(request, prompt, parameters) as stream:
        deadline = common.generation_deadline(request)
        response = await common.open_event_stream(request, stream, deadline)
        return await _write_events(request, response, stream, deadline, prompt, flags)


async def _write_events(request: web.Request, response: web.StreamResponse, stream: Stream, deadline: float,
                        prompt: str, flags: dict[str, bool]) -> web.StreamResponse:
    text, index, tokens = "", 0, []
    async for event in request.app[RUNTIME].streams.events(stream, deadline):
        if event.error is not None:
            kind = _error_type(event.error)
            await common.send_event(response, orjson.dumps({"error": event.error.message, "error_type": kind}))
            break
        if event.token is None:
            if event.end is not None and event.end.finish_reason == "cancelled":
                break
            continue
        index += 1
        text += event.token.text
        tokens.append(event.token)
        last = event.end is not None
        await common.send_event(response, orjson.dumps({
            "index": index, "token": _token(event.token), "top_tokens": None,
            "generated_text": (prompt + text if flags["return_full_text"] else text) if last else None,
            "details": _details(tokens, event.end, with_tokens=False) if last and event.end else None,
        }))
    await response.write_eof()
    return response


def _error_type(error: errors.PipeserveError) -> str:
    """TGI's error_type for an error mid-stream (huggingface_hub raises a typed error for each)."""
    if isinstance(error, errors.Overloaded):
        return "overloaded"
    if isinstance(error, (errors.RequestTimeout, errors.WorkerCrashed)):
        return "incomplete_generation"  # it started, and cannot finish
    return "generation"


ROUTES = (
    Route("POST", "/generate", generate, "Generate text (TGI)", "tei", request=REQUEST, response=RESPONSE,
          tasks=(GENERATION_TASK,)),
    Route("POST", "/generate_stream", generate_stream, "Generate text, token by token as server-sent events (TGI)",
          "tei", request=REQUEST, response=ANY_JSON, media="text/event-stream", tasks=(GENERATION_TASK,)),
)
