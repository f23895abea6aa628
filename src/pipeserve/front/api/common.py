"""What every API dialect does with a request once it is translated: admit it, wait for it.

A dialect parses its own body, then calls `run_jobs` with the inputs and the pipeline
parameters: one job per input goes through the same door (Batcher.submit) whatever the route.
A request with more inputs than a window enters the queue a window at a time as its earlier
inputs finish, so a large client batch (LangChain sends 1000 texts) neither needs a queue that
large nor holds every later request behind all of its inputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from pipeserve.front import errors, params
from pipeserve.front.batcher import Job
from pipeserve.front.runtime import BATCH_SIZE, REQUEST_ID, RUNTIME, LoadedModel
from pipeserve.ipc import Op

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


def serving_model(request: web.Request) -> LoadedModel:
    """The loaded model, or 503 while none serves (before the body is even read)."""
    return request.app[RUNTIME].serving_model()


async def read_body(request: web.Request) -> bytes:
    """The whole body, within --body-timeout (408 after); 413 past --max-body-bytes."""
    timeout = request.app[RUNTIME].config.body_timeout
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except TimeoutError:
        raise errors.BodyTimeout() from None


def check_input_sizes(inputs: Sequence[Any], limit: int) -> None:
    """413 for one input over --max-input-bytes (the body limit admits whole client batches)."""
    for index, item in enumerate(inputs):
        parts = item.values() if isinstance(item, dict) else [item]  # a text pair counts whole
        size = sum(len(part.encode()) if isinstance(part, str) else len(part) if isinstance(part, bytes)
                   else 0 for part in parts)
        if size > limit:
            raise errors.PayloadTooLarge(f"input {index} is {size} bytes; at most {limit} per input "
                                         "(--max-input-bytes)")


def require_task(model: LoadedModel, route: str, *tasks: str) -> None:
    """400 on a route that does not fit the served task (e.g. /rerank on an embedding model)."""
    if model.ready.task not in tasks:
        raise errors.BadRequest(f"{route} needs a {' or '.join(tasks)} model; this server's model "
                                f"serves {model.ready.task}")


async def run_jobs(request: web.Request, model: LoadedModel, inputs: Sequence[Any],
                   parameters: dict[str, Any], op: Op = Op.PIPELINE) -> list[Job]:
    """Submit one job per input, wait for all; the first failed input's error is raised.

    Pipeline parameters are validated against the loaded model's schema; a tokenizer operation
    takes the dialect's own (already checked) parameters.
    """
    runtime = request.app[RUNTIME]
    config = runtime.config
    if len(inputs) > config.max_items:
        raise errors.PayloadTooLarge(f"{len(inputs)} inputs; at most {config.max_items} per request")
    check_input_sizes(inputs, config.max_input_bytes)
    if op is Op.PIPELINE:
        key = params.check_parameters(parameters, model.schema, model.open_parameters)
    else:
        key = orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS).decode()
    timeout = request_timeout(request, config.request_timeout)
    deadline = time.monotonic() + timeout
    # Two batches' worth per worker: enough for length-aware batching to choose from, few
    # enough that a request arriving meanwhile waits behind one window, not the whole batch.
    window = 2 * config.max_batch_size * config.worker_count()
    batcher = runtime.batcher

    def submit(items: Sequence[Any], admitted: bool) -> list[Job]:
        return batcher.submit(list(items), parameters, key, request[REQUEST_ID], deadline, op, admitted)

    jobs = submit(inputs[:window], admitted=False)  # the door: 503 at once when full
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
            more = inputs[len(jobs):len(jobs) + len(finished)]
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
