"""The Hugging Face Inference API dialect: `POST /` with a raw body or `{"inputs", "parameters"}`.

Translates a request into one job per input and the jobs' results into the response; validation
of parameters comes from the loaded task's schema (front/params.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Any

import orjson
from aiohttp import web

from pipeserve.front import errors, params
from pipeserve.front.batcher import Job
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import BATCH_SIZE, REQUEST_ID, RUNTIME
from pipeserve.ipc import InputKind

TIMEOUT_HEADER = "X-Request-Timeout"
# Top-level JSON fields: the Hugging Face Inference API's; `options` is accepted and ignored.
_JSON_FIELDS = frozenset({"inputs", "parameters", "options"})


async def predict(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    config = runtime.config
    timeout = request_timeout(request, config.request_timeout)
    deadline = time.monotonic() + timeout
    # First: while no model is loaded, what inputs and parameters it takes is not known yet.
    model = runtime.serving_model()
    # request.read() raises 413 past client_max_size (--max-body-bytes).
    inputs, parameters, single = parse_body(await request.read(), request.content_type,
                                            config.max_items, model.input_kind)
    parameters_key = params.check_parameters(parameters, model.schema, model.open_parameters)
    jobs = runtime.batcher.submit(inputs, parameters, parameters_key, request[REQUEST_ID], deadline)
    try:
        results = await gather_results(jobs, timeout, single)
    finally:
        request[BATCH_SIZE] = max(job.batch_size for job in jobs)
    return json_response(results[0] if single else results)


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


def parse_body(body: bytes, content_type: str, max_items: int,
               kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    """(inputs, parameters, single) from a raw body or a JSON {"inputs", "parameters"}.

    Text pipelines take strings. Image and audio pipelines take the bytes of a file: the raw
    body (Content-Type image/* or audio/*), or base64 strings in JSON.
    """
    if not body:
        raise errors.BadRequest("empty body: send the input, or JSON {\"inputs\": ...}")
    if content_type == "application/json" or content_type.endswith("+json"):
        return _parse_json(body, max_items, kind)
    if content_type.startswith(("image/", "audio/")) or kind is not InputKind.TEXT:
        if kind is InputKind.TEXT:
            raise errors.BadRequest(f"this model takes text, not {content_type}")
        if not content_type.startswith(f"{kind.value}/"):
            raise errors.BadRequest(f"this model takes {kind.value}s: send the file as the body with "
                                    f"Content-Type {kind.value}/..., or base64 in JSON")
        return [body], {}, True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    return [text], {}, True


def _parse_json(body: bytes, max_items: int, kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    document = load_json_object(body, '{"inputs": ..., "parameters": {...}}')
    unknown = sorted(set(document) - _JSON_FIELDS)
    if unknown:
        raise errors.BadRequest(f"unknown field {unknown[0]!r}; expected inputs, parameters")
    if "inputs" not in document:
        raise errors.BadRequest('missing "inputs"')
    inputs = document["inputs"]
    single = not isinstance(inputs, list)
    items = [inputs] if single else inputs
    if not items:
        raise errors.BadRequest('"inputs" is an empty list')
    if len(items) > max_items:
        raise errors.PayloadTooLarge(f"{len(items)} inputs; at most {max_items} per request")
    where = ['"inputs"'] if single else [f'"inputs"[{index}]' for index in range(len(items))]
    for place, item in zip(where, items, strict=True):
        if not isinstance(item, str):
            what = "a string" if kind is InputKind.TEXT else f"a base64-encoded {kind.value} file"
            raise errors.BadRequest(f"{place} must be {what}, not {json_type(item)}")
    if kind is not InputKind.TEXT:
        items = [_base64_file(item, place, kind) for place, item in zip(where, items, strict=True)]
    parameters = document.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise errors.BadRequest(f'"parameters" must be an object, not {json_type(parameters)}')
    return items, parameters, single


def load_json_object(body: bytes, expected: str) -> dict[str, Any]:
    """The JSON object a body holds, or BadRequest saying what was expected."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise errors.BadRequest(f"JSON body must be an object: {expected}")
    return document


def _base64_file(text: str, where: str, kind: InputKind) -> bytes:
    """The bytes of a base64 string, or of a data: URL (data:image/png;base64,...)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.BadRequest(f"{where} is not valid base64") from None
    if not data:
        raise errors.BadRequest(f"{where} is an empty {kind.value} file")
    return data


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


async def gather_results(jobs: list[Job], timeout: float, single: bool) -> list[Any]:
    """Wait for every job; the first failed input's error becomes the response."""
    futures = [job.future for job in jobs]
    try:
        _, pending = await asyncio.wait(futures, timeout=timeout)
    finally:
        # Timed out, or the client went away (aiohttp cancels the handler): jobs still queued
        # are dropped by the batcher and never computed.
        for future in futures:
            if not future.done():
                future.cancel()
    if pending:
        raise errors.RequestTimeout()
    failures = [future.exception() for future in futures]  # retrieve every one, not just the first
    for index, error in enumerate(failures):
        if error is not None:
            if isinstance(error, errors.PipeserveError) and not single:
                raise error.at_index(index)
            raise error
    return [future.result() for future in futures]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/", predict)
