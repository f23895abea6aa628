"""OpenAI's generation routes: `POST /v1/completions`, `POST /v1/chat/completions`, plain or
streamed (server-sent `chat.completion.chunk` / `text_completion` events ending with
`data: [DONE]`), in OpenAI's error envelope (openai.DIALECT)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
import orjson
from aiohttp import web

from pipeserve import ipc
from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.api.contract import (
    Answer,
    Body,
    MaxNewTokens,
    NonEmptyText,
    Seed,
    StopList,
    Temperature,
    TopP,
    decode,
    neutral,
)
from pipeserve.front.api.openai import DIALECT, AnyModel, OpenAIError, openai_body
from pipeserve.front.api.routes import Route
from pipeserve.front.jsonio import json_response
from pipeserve.front.streams import Stream
from pipeserve.ipc import GENERATION_TASK, Ready


class StreamOptions(Body):
    include_usage: bool | None = None


class Sampling(Body):
    """What completions and chat completions share."""

    model: AnyModel | None = None
    max_tokens: MaxNewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: NonEmptyText | StopList | None = None
    seed: Seed | None = None
    n: Annotated[int, neutral(1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None
    presence_penalty: Annotated[float, neutral(0)] | None = None
    frequency_penalty: Annotated[float, neutral(0)] | None = None


class CompletionsRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    echo: Annotated[bool, neutral(False)] | None = None
    logprobs: None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxNewTokens | None = None
    logprobs: Annotated[bool, neutral(False)] | None = None


FinishReason = Literal["stop", "length"]


class PromptTokensDetails(Answer):
    cached_tokens: int  # prompt tokens whose keys and values a kept prefix gave (OpenAI's prompt caching field)


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(Answer):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None


class Completion(Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(Answer):
    role: Literal["assistant"]
    content: str


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None


class ChatCompletion(Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Answer):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: None


class ChatChunk(Answer):
    """A streamed chat event; with stream_options.include_usage, a last one with `usage` and no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(Answer):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class CompletionChunk(Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


def _sampling(document: Sampling, max_tokens: int | None, limit: int) -> dict[str, Any]:
    for name in ("echo", "logprobs"):
        if getattr(document, name, None):
            raise errors.BadRequest(f'"{name}" is not supported', param=name)
    temperature = document.temperature
    wanted = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": document.top_p,
              "seed": document.seed, "stop": document.stop, "ignore_eos": document.ignore_eos,
              # OpenAI samples at temperature 1 by default; 0 is greedy.
              "do_sample": (1.0 if temperature is None else temperature) > 0}
    return common.generation_parameters(wanted, limit)


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Chat messages with text content (a string, or a list of {"type": "text", "text"} parts)."""
    return [{"role": message.role, "content": message.content if isinstance(message.content, str)
             else "".join(part.text for part in message.content)} for message in messages]


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """OpenAI answers the text before a stop sequence, without it."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[:min(cuts)] if cuts else text


def _finish(end: ipc.StreamEnd) -> str:
    return "length" if end.finish_reason == "length" else "stop"


def _usage(end: ipc.StreamEnd) -> dict[str, Any]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.generated_tokens,
            "total_tokens": end.prompt_tokens + end.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": end.cached_tokens}}


async def completions(request: web.Request) -> web.StreamResponse:
    document = decode(await common.read_body(request), CompletionsRequest)
    await common.serving_model(request, document.model)
    prompt = document.prompt if isinstance(document.prompt, str) else document.prompt[0]
    parameters = _sampling(document, document.max_tokens, common.max_new_tokens(common.model_of(request)))
    return await _respond(request, "text_completion", parameters, document, prompt=prompt)


def has_chat_template(ready: Ready) -> str | None:
    return None if ready.details.get("chat_template") else "this model has no chat template: use /v1/completions"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    document = decode(await common.read_body(request), ChatRequest)
    await common.serving_model(request, document.model)
    max_tokens = document.max_completion_tokens or document.max_tokens
    parameters = _sampling(document, max_tokens, common.max_new_tokens(common.model_of(request)))
    return await _respond(request, "chat.completion", parameters, document, messages=_messages(document.messages))


async def _respond(request: web.Request, kind: str, parameters: dict[str, Any], document: Sampling,
                   prompt: str | None = None, messages: list[dict[str, Any]] | None = None) -> web.StreamResponse:
    include_usage = bool(document.stream_options and document.stream_options.include_usage)
    head = {"id": f"{'chatcmpl' if messages is not None else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": common.model_of(request).served_model_name}
    stops = parameters.get("stop") or []
    async with common.generation(request, prompt, parameters, messages) as stream:
        if document.stream:
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

    async with common.cut_off_past(request, deadline):
        if chat:
            await send(None, None, role=True)
        # The text is sent up to its last characters that could begin a stop sequence: a stop split
        # over tokens is then never half sent, and the streamed text is the plain answer's.
        held = max((len(stop) - 1 for stop in stops if stop), default=0)
        generated = sent = ""
        async for event in common.model_of(request).streams.events(stream, deadline):
            if event.error is not None:
                if len(text := _cut_at_stop(generated, stops)) > len(sent):
                    await send(text[len(sent):], None)  # what was held back for a stop that never came
                await common.send_event(response, orjson.dumps(openai_body(event.error)))
                break
            generated += event.token.text if event.token is not None else ""
            text = _cut_at_stop(generated, stops)
            sure = text if event.end is not None else text[:max(len(text) - held, 0)]
            if len(sure) > len(sent):
                await send(sure[len(sent):], None)
                sent = sure
            if event.end is not None and event.end.finish_reason != "cancelled":
                await send(None, _finish(event.end))
                if include_usage:
                    await common.send_event(response, orjson.dumps({**head, "object": chunk_kind, "choices": [],
                                                                    "usage": _usage(event.end)}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response


ROUTES = (
    Route("POST", "/v1/completions", completions, "Text completions (OpenAI), plain or streamed", DIALECT,
          request=CompletionsRequest, response=Completion, tasks=(GENERATION_TASK,), model_field=True,
          events=(CompletionChunk, OpenAIError), events_end="[DONE]",
          examples=({"prompt": "Once upon a time", "max_tokens": 16},)),
    Route("POST", "/v1/chat/completions", chat_completions, "Chat completions (OpenAI), plain or streamed",
          DIALECT, request=ChatRequest, response=ChatCompletion, tasks=(GENERATION_TASK,), model_field=True,
          events=(ChatChunk, OpenAIError), events_end="[DONE]",
          requires=has_chat_template,
          examples=({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16},)),
)
