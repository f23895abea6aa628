"""The aiohttp front: parse and validate (4xx before the model is touched), submit, answer JSON.

Routes: `POST /` (predict), `GET /health` (the front is alive), `GET /ready` (the model is loaded
and serving), `GET /info` (model, settings, versions, counters). One middleware gives every
response an `X-Request-Id` and turns every error into `{"error": ...}` JSON; unexpected
exceptions become a generic 500 whose detail goes to the log only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from pipeserve import errors, metrics, outputs, params
from pipeserve.batcher import Job
from pipeserve.runtime import Runtime

log = logging.getLogger("pipeserve.http")
access_log = logging.getLogger("pipeserve.access")

RUNTIME = web.AppKey("runtime", Runtime)
REQUEST_ID_HEADER = "X-Request-Id"
TIMEOUT_HEADER = "X-Request-Timeout"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Top-level JSON fields: the Hugging Face Inference API's; `options` is accepted and ignored.
_JSON_FIELDS = frozenset({"inputs", "parameters", "options"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=outputs.dumps(body), status=status, headers=headers,
                        content_type="application/json")


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every response an X-Request-Id; turn every error into JSON without internals."""
    client_id = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
    request["request_id"] = request_id
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except errors.PipeserveError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "request %s: %d %s", request_id, exc.status, exc.message)
        response = json_response(exc.body(), exc.status, exc.headers())
    except web.HTTPException as exc:  # routing (404, 405) and aiohttp's own body limit (413)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        response = json_response({"error": message}, exc.status, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s: unexpected error", request_id)
        response = json_response({"error": "internal server error"}, 500)
    response.headers[REQUEST_ID_HEADER] = request_id
    _account(request, response.status, time.perf_counter() - started)
    return response


def _account(request: web.Request, status: int, seconds: float) -> None:
    """One access line and the request metrics, for every answered request."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[RUNTIME].metrics.observe_request(route, status, seconds)
    batch_size = request.get("batch_size")
    access_log.info("%s %s %d %.1fms batch=%s id=%s", request.method, request.path, status,
                    seconds * 1000, batch_size if batch_size is not None else "-", request["request_id"],
                    extra={"method": request.method, "path": request.path, "status": status,
                           "latency_ms": round(seconds * 1000, 3), "batch_size": batch_size,
                           "request_id": request["request_id"]})


# Routes a load balancer or service manager probes without credentials.
PUBLIC_PATHS = frozenset({"/health", "/ready"})


def require_api_key(key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: every route but PUBLIC_PATHS needs `Authorization: Bearer <key>`."""
    expected = key.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken does not reveal how much of the key matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
                raise errors.Unauthorized()
        return await handler(request)

    return check


_HTTP_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
}


# --- handlers -------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    reason = request.app[RUNTIME].unavailable_reason()
    if reason is None:
        return json_response({"status": "ready"})
    return json_response({"status": "unavailable", "reason": reason}, 503)


async def info(request: web.Request) -> web.Response:
    return json_response(request.app[RUNTIME].info())


async def prometheus_metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def predict(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    config = runtime.config
    timeout = _request_timeout(request, config.request_timeout)
    deadline = time.monotonic() + timeout
    # First: while no model is loaded, what inputs and parameters it takes is not known yet.
    runtime.check_available()
    # request.read() raises 413 past client_max_size (--max-body-bytes).
    inputs, parameters, single = _parse_body(await request.read(), request.content_type,
                                             config.max_items, runtime.input_kind())
    parameters_key = params.check_parameters(parameters, runtime.accepted_parameters())
    jobs = runtime.batcher.submit(inputs, parameters, parameters_key, request["request_id"], deadline)
    try:
        results = await _results(jobs, timeout, single)
    finally:
        request["batch_size"] = max(job.batch_size for job in jobs) or None
    return json_response(results[0] if single else results)


def _request_timeout(request: web.Request, server_timeout: float) -> float:
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


def _parse_body(body: bytes, content_type: str, max_items: int,
                kind: str) -> tuple[list[Any], dict[str, Any], bool]:
    """(inputs, parameters, single) from a raw body or a JSON {"inputs", "parameters"}.

    Text pipelines take strings. Image and audio pipelines take the bytes of a file: the raw
    body (Content-Type image/* or audio/*), or base64 strings in JSON.
    """
    if not body:
        raise errors.BadRequest("empty body: send the input, or JSON {\"inputs\": ...}")
    if content_type == "application/json" or content_type.endswith("+json"):
        return _parse_json(body, max_items, kind)
    if content_type.startswith(("image/", "audio/")) or kind != "text":
        if kind == "text":
            raise errors.BadRequest(f"this model takes text, not {content_type}")
        if not content_type.startswith(f"{kind}/"):
            raise errors.BadRequest(f"this model takes {kind}s: send the file as the body with "
                                    f"Content-Type {kind}/..., or base64 in JSON")
        return [body], {}, True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    return [text], {}, True


def _parse_json(body: bytes, max_items: int, kind: str) -> tuple[list[Any], dict[str, Any], bool]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise errors.BadRequest('JSON body must be an object: {"inputs": ..., "parameters": {...}}')
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
    for index, item in enumerate(items):
        if not isinstance(item, str):
            where = '"inputs"' if single else f'"inputs"[{index}]'
            what = "a string" if kind == "text" else f"a base64-encoded {kind} file"
            raise errors.BadRequest(f"{where} must be {what}, not {_json_type(item)}")
    if kind != "text":
        items = [_base64_file(item, '"inputs"' if single else f'"inputs"[{index}]', kind)
                 for index, item in enumerate(items)]
    parameters = document.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise errors.BadRequest(f'"parameters" must be an object, not {_json_type(parameters)}')
    return items, parameters, single


def _base64_file(text: str, where: str, kind: str) -> bytes:
    """The bytes of a base64 string, or of a data: URL (data:image/png;base64,...)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.BadRequest(f"{where} is not valid base64") from None
    if not data:
        raise errors.BadRequest(f"{where} is an empty {kind} file")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


async def _results(jobs: list[Job], timeout: float, single: bool) -> list[Any]:
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


def create_app(runtime: Runtime) -> web.Application:
    middlewares: list[Any] = [request_id_and_errors]
    api_key = runtime.config.required_api_key()
    if api_key:
        middlewares.append(require_api_key(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=runtime.config.max_body_bytes)
    app[RUNTIME] = runtime
    app.router.add_post("/", predict)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", prometheus_metrics)
    return app
