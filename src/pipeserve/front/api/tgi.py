"""The text-generation-inference dialect: `POST /generate`, `POST /generate_stream`, and `POST /`
on a text generator (with `"stream": true`, how huggingface_hub's text_generation streams).

Streams are server-sent events, one per token: `{"index", "token": {"id", "text", "logprob",
"special"}, "generated_text", "details", "top_tokens"}`; the last carries `generated_text` and
(when asked) `details`; an error mid-stream is one `{"error", "error_type"}` event. No `[DONE]`.
Errors before the stream starts use TEI/TGI's envelope too.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, ClassVar, Literal

import orjson
from aiohttp import web

from pipeserve import ipc
from pipeserve.front import errors
from pipeserve.front.api import common, tei
from pipeserve.front.api.contract import (
    Answer,
    Body,
    MaxNewTokens,
    Seed,
    StopList,
    Temperature,
    Texts,
    TopK,
    TopP,
    decode,
    neutral,
)
from pipeserve.front.api.routes import Dialect, Route
from pipeserve.front.jsonio import json_response
from pipeserve.front.streams import Stream
from pipeserve.ipc import GENERATION_TASK


class Parameters(Body):
    max_new_tokens: MaxNewTokens | None = None
    do_sample: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: StopList | None = None
    ignore_eos: bool | None = None
    details: bool | None = None
    return_full_text: bool | None = None
    decoder_input_details: Annotated[bool, neutral(False)] | None = None
    watermark: Annotated[bool, neutral(False)] | None = None
    # Accepted at their neutral value only (huggingface_hub sends them); anything else is refused.
    best_of: Annotated[int, neutral(1)] | None = None
    top_n_tokens: Annotated[int, neutral(0)] | None = None
    repetition_penalty: Annotated[float, neutral(1)] | None = None
    frequency_penalty: Annotated[float, neutral(0)] | None = None
    typical_p: Annotated[float, neutral(1)] | None = None
    truncate: None = None
    grammar: None = None
    adapter_id: None = None


class Request(Body):
    inputs: str
    parameters: Parameters | None = None
    stream: bool | None = None


class RootRequest(Body):
    """`POST /` on a text generator: TGI's body, with a list of prompts too (answered as a list)."""

    inputs: Texts
    parameters: Parameters | None = None
    stream: bool | None = None
    options: dict[str, Any] | None = None  # the hosted API's caching options: ignored
    # Streamed, it takes one prompt (root() refuses a list): not streamed, or a string.
    across: ClassVar = {"anyOf": [{"properties": {"stream": {"enum": [False, None]}}},
                                  {"properties": {"inputs": {"type": "string"}}}]}


class Token(Answer):
    id: int
    text: str
    logprob: float
    special: bool


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class Details(Answer):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[Token]
    tokens: list[Token]


class Response(Answer):
    generated_text: str
    details: Details | None = None


class StreamDetails(Answer):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamEvent(Answer):
    """One token; the last also carries the whole text and (asked or not) the details."""

    index: int
    token: Token
    top_tokens: None
    generated_text: str | None
    details: StreamDetails | None


EVENTS = (StreamEvent, tei.TeiError)  # a failure mid-stream is one error event


def parse(parameters: Parameters | None, limit: int) -> tuple[dict[str, Any], dict[str, bool]]:
    """(engine parameters, {"details", "return_full_text"}) from a TGI request's parameters."""
    raw = parameters or Parameters()
    for name in ("decoder_input_details", "watermark"):
        if getattr(raw, name):
            raise errors.BadRequest(f"parameter {name!r} is not supported (only false)", param=name)
    flags = {"details": bool(raw.details), "return_full_text": bool(raw.return_full_text)}
    wanted = {name: getattr(raw, name) for name in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                                    "top_k", "seed", "stop", "ignore_eos")}
    # TGI samples when asked to, or when given a sampling knob.
    if raw.do_sample is None and any(value is not None for value in (raw.temperature, raw.top_p, raw.top_k)):
        wanted["do_sample"] = raw.temperature != 0
    return common.generation_parameters(wanted, limit), flags


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


def _limit(request: web.Request) -> int:
    return common.max_new_tokens(common.model_of(request))


async def generate(request: web.Request) -> web.Response:
    document = decode(await common.read_body(request), Request)
    parameters, flags = parse(document.parameters, _limit(request))
    return json_response(await answer(request, document.inputs, parameters, flags))


async def root(request: web.Request, document: RootRequest) -> web.StreamResponse:
    """`POST /` on a generator: streamed as /generate_stream, or a list of /generate answers."""
    parameters, flags = parse(document.parameters, _limit(request))
    if document.stream:
        if not isinstance(document.inputs, str):
            raise errors.BadRequest('"stream": true takes one prompt in "inputs"', param="inputs")
        return await stream_events(request, document.inputs, parameters, flags)
    prompts = [document.inputs] if isinstance(document.inputs, str) else document.inputs
    if len(prompts) > common.model_of(request).config.max_items:
        raise errors.PayloadTooLarge(f"{len(prompts)} inputs; at most {common.model_of(request).config.max_items} "
                                     "per request")
    # One stream per prompt, side by side in the engine, at most --max-running-sequences at a time:
    # all at once, a list longer than the stream door admits was refused whole (503), however idle
    # the server. The first failure cancels the others.
    slots = asyncio.Semaphore(common.model_of(request).config.max_running_sequences)

    async def in_turn(prompt: str) -> dict[str, Any]:
        async with slots:
            return await answer(request, prompt, parameters, flags)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(in_turn(prompt)) for prompt in prompts]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return json_response([task.result() for task in tasks])


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
    document = decode(await common.read_body(request), Request)
    parameters, flags = parse(document.parameters, _limit(request))
    return await stream_events(request, document.inputs, parameters, flags)


async def stream_events(request: web.Request, prompt: str, parameters: dict[str, Any],
                        flags: dict[str, bool]) -> web.StreamResponse:
    """TGI's token events for one generation (a 4xx or 503 comes before the first event)."""
    async with common.generation(request, prompt, parameters) as stream:
        deadline = common.generation_deadline(request)
        response = await common.open_event_stream(request, stream, deadline)
        return await _write_events(request, response, stream, deadline, prompt, flags)


async def _write_events(request: web.Request, response: web.StreamResponse, stream: Stream, deadline: float,
                        prompt: str, flags: dict[str, bool]) -> web.StreamResponse:
    async with common.cut_off_past(request, deadline):
        await _write_each_event(request, response, stream, deadline, prompt, flags)
        await response.write_eof()
    return response


async def _write_each_event(request: web.Request, response: web.StreamResponse, stream: Stream, deadline: float,
                            prompt: str, flags: dict[str, bool]) -> None:
    text, index, tokens = "", 0, []
    async for event in common.model_of(request).streams.events(stream, deadline):
        if event.error is not None:
            await common.send_event(response, orjson.dumps(tgi_body(event.error, mid_stream=True)))
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


def _error_type(error: errors.PipeserveError, mid_stream: bool = False) -> str:
    """TGI's error_type (huggingface_hub raises a typed error for each: ValidationError,
    OverloadedError, IncompleteGenerationError, GenerationError). A crash before the first token
    is a refusal to retry (overloaded); during a stream, a generation cut short."""
    if isinstance(error, errors.RequestTimeout) or (mid_stream and isinstance(error, errors.WorkerCrashed)):
        return "incomplete_generation"
    if isinstance(error, errors.Unavailable):
        return "overloaded"
    if error.status < 500:
        return str(tei.tei_body(error)["error_type"])  # validation; unauthorized
    return "generation"


def tgi_body(error: errors.PipeserveError, mid_stream: bool = False) -> dict[str, object]:
    return {"error": error.message, "error_type": _error_type(error, mid_stream)}


DIALECT = Dialect("tgi", tgi_body, tei.TeiError)


EXAMPLE = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 16}}
ROUTES = (
    Route("POST", "/generate", generate, "Generate text (TGI)", DIALECT, request=Request, response=Response,
          tasks=(GENERATION_TASK,), examples=(EXAMPLE,)),
    Route("POST", "/generate_stream", generate_stream, "Generate text, token by token as server-sent events (TGI)",
          DIALECT, request=Request, response=StreamEvent, media="text/event-stream", tasks=(GENERATION_TASK,),
          events=EVENTS, examples=(EXAMPLE,)),
)
