"""The front's HTTP face: the aiohttp app, its middleware, and the operational routes.

Routes: the API dialects' (front/api/), `GET /health` (the front is alive), `GET /ready` (the
model is loaded and serving), `GET /info` (model, settings, versions, counters), `GET /metrics`.
One middleware gives every response an `X-Request-Id` and turns every error into `{"error": ...}`
JSON; unexpected exceptions become a generic 500 whose detail goes to the log only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pipeserve.front import errors, metrics
from pipeserve.front.api import hf, openai, openapi, tei, tgi
from pipeserve.front.api.common import require_task
from pipeserve.front.api.routes import Route, add_routes, obj
from pipeserve.front.jsonio import json_response
from pipeserve.front.page import PAGE
from pipeserve.front.runtime import BATCH_SIZE, REQUEST_ID, RUNTIME, STREAM, Runtime

log = logging.getLogger("pipeserve.http")
access_log = logging.getLogger("pipeserve.access")

REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every response an X-Request-Id; turn every error into JSON without internals."""
    client_id = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = client_id if _CLIENT_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    response: web.StreamResponse
    envelope = envelope_for(request.path)
    try:
        response = await handler(request)
    except errors.PipeserveError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "request %s: %d %s", request_id, exc.status, exc.message)
        response = json_response(envelope(exc.status, exc.message, exc.index), exc.status, exc.headers())
    except web.HTTPException as exc:  # routing (404, 405) and aiohttp's own body limit (413)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        response = json_response(envelope(exc.status, message, None), exc.status, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s: unexpected error", request_id)
        response = json_response(envelope(500, "internal server error", None), 500)
    response.headers[REQUEST_ID_HEADER] = request_id
    _account(request, response.status, time.perf_counter() - started)
    return response


def _account(request: web.Request, status: int, seconds: float) -> None:
    """One access line and the request metrics, for every answered request."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[RUNTIME].metrics.observe_request(route, status, seconds, (request.method, route) in _MODEL_ROUTES)
    batch_size = request.get(BATCH_SIZE) or None
    fields: dict[str, object] = {"method": request.method, "path": request.path, "status": status,
                                 "latency_ms": round(seconds * 1000, 3), "batch_size": batch_size,
                                 "request_id": request[REQUEST_ID]}
    stream = request.get(STREAM)
    path = printable(request.path)  # a decoded %0A would otherwise end the line and forge the next
    if stream is None:
        access_log.info("%s %s %d %.1fms batch=%s id=%s", request.method, path, status,
                        seconds * 1000, batch_size if batch_size is not None else "-", request[REQUEST_ID],
                        extra=fields)
        return
    end = stream.end
    fields.update(prompt_tokens=end.prompt_tokens if end else None, generated_tokens=stream.tokens,
                  finish_reason=end.finish_reason if end else "cancelled")
    access_log.info("%s %s %d %.1fms prompt_tokens=%s generated_tokens=%d finish=%s id=%s", request.method,
                    path, status, seconds * 1000, fields["prompt_tokens"], stream.tokens,
                    fields["finish_reason"], request[REQUEST_ID], extra=fields)


def printable(text: str) -> str:
    """`text` with every character that is not printable (newlines, escapes) written as \\xNN."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                   for c in text)


def require_api_key(key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware: every route but the public ones (/health, /ready) needs `Authorization: Bearer <key>`."""
    expected = key.encode()
    # By method and declared path: GET / (the page) is public, POST / (the model) is not.
    public = frozenset((route.method, route.path) for route in ROUTES if route.public)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        declared = resource.canonical if resource is not None else request.path
        if (request.method, declared) not in public:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken does not reveal how much of the key matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
                raise errors.Unauthorized()
        return await handler(request)

    return check


def envelope_for(path: str) -> errors.Envelope:
    """Errors answer in the envelope of the API dialect the request came through: the one its
    route declares, or OpenAI's anywhere under /v1/ (an unknown model or route included)."""
    dialect = _DIALECT_BY_PATH.get(path, "openai" if path.startswith("/v1/") else "hf")
    return errors.ENVELOPES[dialect]


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
    runtime = request.app[RUNTIME]
    return json_response({**runtime.info(), **tei.info_fields(runtime)})


async def prometheus_metrics(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def stats(request: web.Request) -> web.Response:
    return json_response(request.app[RUNTIME].stats())


async def openapi_document(request: web.Request) -> web.Response:
    """The routes this server's model serves (all of them while none has loaded and --task is unset)."""
    runtime = request.app[RUNTIME]
    loaded = runtime.loaded_model()
    task = loaded.ready.task if loaded else runtime.config.task
    served = [route for route in ROUTES if route.serves(task)]
    return json_response(openapi.document(served, bool(runtime.config.required_api_key())))


_STATUS = {"type": "string"}
OPERATIONS = (
    Route("GET", "/health", health, "The front process is alive", "ops", public=True,
          response=obj({"status": {"type": "string", "enum": ["ok"]}}, required=["status"])),
    Route("GET", "/ready", ready, "A model process is loaded and serving (503 otherwise)", "ops", public=True,
          response=obj({"status": _STATUS, "reason": _STATUS}, required=["status"])),
    Route("GET", "/info", info, "Model, settings, versions, workers, counters; TEI's fields", "ops",
          response={"type": "object"}),
    Route("GET", "/metrics", prometheus_metrics, "Prometheus metrics (text exposition)", "ops",
          response={"type": "string"}, media="text/plain"),
    Route("GET", "/openapi.json", openapi_document, "This document", "ops", response={"type": "object"}),
    Route("GET", "/stats", stats, "Live figures for the page: totals, gauges, recent latency quantiles",
          "ops", response={"type": "object", "required": ["requests", "latency_ms", "queue_depth", "workers"]}),
    Route("GET", "/", PAGE.index, "The page, for a browser (Accept: text/html)", "hf", public=True,
          media="text/html", documented=False),
    Route("GET", "/page/{name}", PAGE.asset, "The page's script and style", "ops", public=True,
          media="text/plain", documented=False),
)
ROUTES = (*OPERATIONS, *hf.ROUTES, *openai.ROUTES, *openai.GENERATION_ROUTES, *tei.ROUTES, *tgi.ROUTES)
_DIALECT_BY_PATH = {route.path: route.dialect for route in ROUTES}
# What the page's figures count: the routes that ask the model, not probes, scrapes or the page.
_MODEL_ROUTES = frozenset((route.method, route.path) for route in ROUTES if route.dialect != "ops" and route.documented)


def create_app(runtime: Runtime) -> web.Application:
    middlewares: list[Any] = [request_id_and_errors]
    api_key = runtime.config.required_api_key()
    if api_key:
        middlewares.append(require_api_key(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=runtime.config.max_body_bytes)
    app[RUNTIME] = runtime
    add_routes(app, ROUTES, require_task)
    return app
