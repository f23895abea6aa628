"""What every API dialect does with a request once it is translated: admit it, wait for it.

A dialect parses its own body, then calls `run_jobs` with the inputs and the pipeline
parameters: one job per input goes through the same door (Batcher.submit) whatever the route.
A request with more inputs than a window enters the queue a window at a time as its earlier
inputs finish, so a large client batch (LangChain sends 1000 texts) neither needs a queue that
large nor holds every later request behind all of its inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from aiohttp import web

from pipeserve import ipc
from pipeserve.front import errors, params
from pipeserve.front.api.routes import Route
from pipeserve.front.batcher import Job
from pipeserve.front.models import MODELS
from pipeserve.front.runtime import ARRIVED, BATCH_SIZE, MODEL, REQUEST_ID, STREAM, LoadedModel, Runtime
from pipeserve.front.streams import Stream
from pipeserve.ipc import Op

log = logging.getLogger("pipeserve.http")

TIMEOUT_HEADER = "X-Request-Timeout"


def request_timeout(request: web.Request, server_timeout: float) -> float:
    """The server's timeout, or the shorter one the request's X-Request-Timeout asks for."""
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return server_timeout
    try:
        value = float(header)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise errors.BadRequest(f"{TIMEOUT_HEADER} must be a number of seconds > 0")
    return min(value, server_timeout)


ROUTE = web.RequestKey("route", Route)  # the declared route a request came in by


def model_of(request: web.Request, name: str | None = None) -> Runtime:
    """The model this request is for, chosen once: the one its path names (`/models/{name}/...`),
    else the one `name` (an OpenAI body's `model` field) names, else the first declared."""
    chosen = request.get(MODEL)
    if chosen is None:
        models = request.app[MODELS]
        in_path = request.match_info.get("model_name")
        chosen = request[MODEL] = models.named(in_path) if in_path else models.by_field(name)
    return chosen


HELD = web.RequestKey("held", Runtime)  # the model this request holds loaded (http releases it)


async def serving_model(request: web.Request, name: str | None = None) -> LoadedModel:
    """The request's model, loaded and able to serve its route: held loaded until the request is
    answered (and loaded first if it was not: front/models.py), 503 while it does not serve, 400
    saying why when its task (or what else the route requires) does not fit."""
    runtime = model_of(request, name)
    if HELD not in request:
        deadline = request_deadline(request)  # a bad header is a 400 before the model is held
        request[HELD] = runtime  # http releases what is here: set only when hold() counts it
        await request.app[MODELS].hold(runtime, deadline)
    loaded = runtime.serving_model()
    route = request.get(ROUTE)
    refusal = route.refusal(loaded.ready) if route is not None else None
    if refusal is not None:
        raise errors.BadRequest(refusal)
    return loaded


async def read_body(request: web.Request) -> bytes:
    """The whole body, within --body-timeout (408 after); 413 past --max-body-bytes."""
    timeout = request.app[MODELS].config.body_timeout  # the server's: the model may be named in the body
    started = time.monotonic()
    try:
        body = await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise errors.BodyTimeout() from None
    # The upload is --body-timeout's to bound: the request's own deadline counts without it.
    request[ARRIVED] = request.get(ARRIVED, started) + (time.monotonic() - started)
    return body


TOKEN_ID_BYTES = 4  # a token id in a /decode list counts as an int32 against --max-input-bytes


def input_size(item: Any) -> int:
    """An input's size against --max-input-bytes: UTF-8 text, a file's bytes, a text pair or a
    chat's messages together, a token id list at TOKEN_ID_BYTES an id."""
    if isinstance(item, str):
        return len(item.encode())
    if isinstance(item, bytes):
        return len(item)
    if isinstance(item, dict):
        return sum(input_size(part) for part in item.values())
    if isinstance(item, list):
        return sum(input_size(part) if isinstance(part, (str, dict)) else TOKEN_ID_BYTES for part in item)
    return 0


def check_input_sizes(inputs: Sequence[Any], limit: int) -> None:
    """413 for one input over --max-input-bytes (the body limit admits whole client batches)."""
    for index, item in enumerate(inputs):
        size = input_size(item)
        if size > limit:
            raise errors.PayloadTooLarge(f"input {index} is {size} bytes; at most {limit} per input "
                                         "(--max-input-bytes)")


async def require_task(route: Route, request: web.Request) -> None:
    """Before a model route reads its body: its model chosen (by path, or the first) and checked
    (serving_model). A route whose body names the model (OpenAI's) is checked once it is read."""
    request[ROUTE] = route
    if not route.model_field:
        await serving_model(request)


async def run_jobs(request: web.Request, model: LoadedModel, inputs: Sequence[Any],
                   parameters: dict[str, Any], op: Op = Op.PIPELINE) -> list[Job]:
    """Submit one job per input, wait for all; the first failed input's error is raised.

    Pipeline parameters are validated against the loaded model's schema; a tokenizer operation
    takes the dialect's own (already checked) parameters.
    """
    runtime = model_of(request)
    config = runtime.config
    if len(inputs) > config.max_items:
        raise errors.PayloadTooLarge(f"{len(inputs)} inputs; at most {config.max_items} per request")
    check_input_sizes(inputs, config.max_input_bytes)
    if op is Op.PIPELINE:
        parameters = params.with_integers(parameters, model.schema)
        key = params.check_parameters(parameters, model.schema, model.open_parameters)
    else:
        key = orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS).decode()
    deadline = request_deadline(request)
    window, reserve = config.admission_window(), config.queue_reserve()
    batcher = runtime.batcher

    def submit(items: Sequence[Any], admitted: bool) -> list[Job]:
        return batcher.submit(list(items), parameters, key, request[REQUEST_ID], deadline, op, admitted,
                              expected=len(inputs))

    with batcher.request():  # a drain waits for all of it, not only for what is queued now
        # The door: the first window whole where the queue has room for it; else, for a request
        # larger than one window, the room above the reserve (so it is not refused beside steady
        # traffic); 503 at once when there is none.
        first = min(window, len(inputs))
        if first > batcher.room > reserve and len(inputs) > window:
            first = batcher.room - reserve
        jobs = submit(inputs[:first], admitted=False)
        waiting = set(jobs)
        try:
            while waiting:
                remaining = deadline - time.monotonic()
                done, _ = await asyncio.wait({job.future for job in waiting}, timeout=max(remaining, 0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise errors.RequestTimeout()
                finished = [job for job in waiting if job.future.done()]
                waiting.difference_update(finished)
                _raise_first_failure(jobs, finished, single=len(inputs) == 1)
                # Back up to a window where the queue has room above the reserve; at least as
                # many as just finished, so the request always progresses.
                count = max(len(finished), min(window - len(waiting), batcher.room - reserve))
                more = inputs[len(jobs):len(jobs) + count]
                if more:
                    added = submit(more, admitted=True)
                    jobs.extend(added)
                    waiting.update(added)
        finally:
            # Failed, timed out, or the client went away (aiohttp cancels the handler): jobs still
            # queued are dropped by the batcher and never computed.
            for job in waiting:
                job.future.cancel()
            request[BATCH_SIZE] = batch_size(jobs)
    return jobs


def _raise_first_failure(jobs: list[Job], finished: list[Job], single: bool) -> None:
    failed = [job for job in finished if not job.future.cancelled() and job.future.exception() is not None]
    if not failed:
        return
    index = min(jobs.index(job) for job in failed)
    error = jobs[index].future.exception()
    assert error is not None
    if isinstance(error, errors.PipeserveError) and not single:
        raise error.at_index(index)
    raise error


def results(jobs: list[Job]) -> list[Any]:
    return [job.future.result() for job in jobs]


def batch_size(jobs: list[Job]) -> int:
    """The largest batch this request's inputs ran in (for the access log)."""
    return max((job.batch_size for job in jobs), default=0)


# --- generation ----------------------------------------------------------------------------------

def max_new_tokens(runtime: Runtime) -> int:
    """The most new tokens a request may ask for here: --max-new-tokens, and fewer than the
    model's positions (its prompt needs one)."""
    loaded = runtime.loaded_model()
    positions = loaded.ready.details.get("max_input_length") if loaded else None
    limit = runtime.config.max_new_tokens
    return min(limit, int(positions) - 1) if isinstance(positions, int) and positions > 1 else limit


def generation_parameters(wanted: dict[str, Any], limit: int) -> dict[str, Any]:
    """The engine's parameters from a dialect's decoded ones (renamed to the engine's names:
    max_new_tokens, do_sample, temperature, top_p, top_k, seed, stop, ignore_eos; None means
    "the default"). Their types and bounds are the contract's; --max-new-tokens is this server's."""
    out = {name: value for name, value in wanted.items() if value is not None}
    out.setdefault("max_new_tokens", min(ipc.DEFAULT_MAX_NEW_TOKENS, limit))
    if out["max_new_tokens"] > limit:
        raise errors.BadRequest(f"'max_new_tokens' must be an integer from 1 to {limit} here (--max-new-tokens, "
                                "and fewer than the model's positions)", param="max_new_tokens")
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


def request_deadline(request: web.Request) -> float:
    """When this request's time is up (--request-timeout, or a shorter X-Request-Timeout), counted
    from its arrival: waiting for its model to load, or for a turn, takes from it."""
    return _arrived(request) + request_timeout(request, model_of(request).config.request_timeout)


def _arrived(request: web.Request) -> float:
    return request.get(ARRIVED) or time.monotonic()


def generation_deadline(request: web.Request) -> float:
    """When this generation's time is up (--generation-timeout, or a shorter X-Request-Timeout).

    A stream of a few hundred tokens among 32 others takes more than half a minute on a CPU, so
    generation has its own, longer bound rather than --request-timeout's.
    """
    return _arrived(request) + request_timeout(request, model_of(request).config.generation_timeout)


async def collect(request: web.Request, stream: Stream) -> tuple[list[ipc.Token], ipc.StreamEnd]:
    """Every token of a stream and its end; the stream's error is raised (before anything is sent)."""
    tokens: list[ipc.Token] = []
    async for event in model_of(request).streams.events(stream, generation_deadline(request)):
        if event.token is not None:
            tokens.append(event.token)
        if event.error is not None:
            raise event.error
        if event.end is not None:
            return tokens, event.end
    raise errors.InferenceFailed("the stream ended without an end")


@contextlib.asynccontextmanager
async def generation(request: web.Request, prompt: str | None, parameters: dict[str, Any],
                     messages: list[dict[str, Any]] | None = None) -> AsyncIterator[Stream]:
    """A generated stream for the handler's `async with`: admitted (503 at once when every
    worker is full), and released however the handler ends, the client leaving included."""
    runtime = model_of(request)
    # Before the prompt reaches the model process, whose loop tokenizes it between other
    # streams' steps: a prompt (or a chat's messages together) over --max-input-bytes is a 413.
    size = input_size(messages if messages is not None else prompt or "")
    if size > runtime.config.max_input_bytes:
        raise errors.PayloadTooLarge(f"the prompt is {size} bytes; at most {runtime.config.max_input_bytes} "
                                     "(--max-input-bytes)")
    async with runtime.streams.opened(request[REQUEST_ID], prompt, parameters, messages) as stream:
        request[STREAM] = stream
        yield stream


async def open_event_stream(request: web.Request, stream: Stream, deadline: float) -> web.StreamResponse:
    """A server-sent-events response, its headers sent once the first token is in: a prompt the
    model refuses, or any failure before it, is answered with its own status instead."""
    await model_of(request).streams.first_event(stream, deadline)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, data: bytes) -> None:
    await response.write(b"data: " + data + b"\n\n")


# How long past its deadline a stream's client has to read its last events (a timeout's error
# event is written at the deadline).
LAST_EVENTS_GRACE_S = 5.0


@contextlib.asynccontextmanager
async def cut_off_past(request: web.Request, deadline: float) -> AsyncIterator[None]:
    """The body writes a stream's events; a client that stops reading is cut off (its connection
    aborted) once past the stream's deadline. A write waits while the socket's buffers are full, and
    nothing else would end that wait: the handler, its stream and its admission slot were held
    for as long as the client held the connection open."""
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0) + LAST_EVENTS_GRACE_S):
            yield
    except TimeoutError:
        log.warning("request %s: its client stopped reading its stream; cut off past the deadline",
                    request[REQUEST_ID])
        if request.transport is not None:
            request.transport.abort()  # close() would wait to flush what the client does not read
