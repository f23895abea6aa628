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
from typing import Any, Literal

from aiohttp import web

from pipeserve.front import errors, metrics
from pipeserve.front.api import completions, hf, openai, openapi, tei, tgi
from pipeserve.front.api.common import HELD, max_new_tokens, require_task
from pipeserve.front.api.contract import Answer
from pipeserve.front.api.routes import NAMED_PREFIX, Dialect, Route, add_routes
from pipeserve.front.jsonio import json_response
from pipeserve.front.models import MODELS, Models
from pipeserve.front.page import PAGE, for_browsers
from pipeserve.front.runtime import ARRIVED, BATCH_SIZE, MODEL, REQUEST_ID, STREAM, Runtime

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
    request[ARRIVED] = time.monotonic()
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except errors.PipeserveError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "request %s: %d %s", request_id, exc.status, exc.message)
        response = _error_answer(request, exc, exc.headers())
    except web.HTTPException as exc:  # routing (404, 405) and aiohttp's own body limit (413)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        response = _error_answer(request, errors.HttpError(exc.status, _HTTP_MESSAGES.get(exc.status, exc.reason)),
                                 headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s: unexpected error", request_id)
        response = _error_answer(request, errors.InferenceFailed("internal server error"))
    finally:
        held = request.get(HELD)
        if held is not None:
            request.app[MODELS].release(held)
    _account(request, response.status, time.perf_counter() - started)
    return response


def _account(request: web.Request, status: int, seconds: float) -> None:
    """One access line and the request metrics, for every answered request."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "/" if request.path == "/" else "unmatched"
    model = request.get(MODEL)
    name = model.name if model is not None else ""
    asks = (request.method, _declared(request)) in _MODEL_ROUTES
    request.app[MODELS].metrics.observe_request(route, status, seconds, asks, model=name)
    batch_size = request.get(BATCH_SIZE) or None
    fields: dict[str, object] = {"method": request.method, "path": request.path, "status": status,
                                 "latency_ms": round(seconds * 1000, 3), "batch_size": batch_size,
                                 "model": name or None, "request_id": request[REQUEST_ID]}
    stream = request.get(STREAM)
    path = printable(request.path)  # a decoded %0A would otherwise end the line and forge the next
    if stream is None:
        access_log.info("%s %s %d %.1fms model=%s batch=%s id=%s", request.method, path, status,
                        seconds * 1000, printable(name) or "-", batch_size if batch_size is not None else "-",
                        request[REQUEST_ID], extra=fields)
        return
    end = stream.end
    fields.update(prompt_tokens=end.prompt_tokens if end else None, generated_tokens=stream.tokens,
                  finish_reason=end.finish_reason if end else "cancelled")
    access_log.info("%s %s %d %.1fms model=%s prompt_tokens=%s generated_tokens=%d finish=%s id=%s",
                    request.method, path, status, seconds * 1000, printable(name) or "-", fields["prompt_tokens"],
                    stream.tokens, fields["finish_reason"], request[REQUEST_ID], extra=fields)


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


def _declared(request: web.Request) -> str | None:
    """The path of the route a request matched, as declared (a `/models/{name}/...` one without
    its prefix); None when it matched none."""
    resource = request.match_info.route.resource
    return resource.canonical.removeprefix(_NAMED) or "/" if resource is not None else None


def _error_answer(request: web.Request, error: errors.PipeserveError,
                  headers: dict[str, str] | None = None) -> web.Response:
    """The error in the envelope of the request's dialect, asked once the handler has run (the
    envelope can depend on the model it chose)."""
    return json_response(dialect_for(request).envelope(error), error.status, headers)


def dialect_for(request: web.Request) -> Dialect:
    """Errors answer in the envelope of the API dialect the request came through: the one its
    route declares (under /models/{name} too) for its model's task where that is known by then,
    or OpenAI's anywhere under /v1/."""
    route = _ROUTE_BY_PATH.get(_declared(request) or request.path)
    if route is None:
        return openai.DIALECT if request.path.startswith("/v1/") else hf.DIALECT
    model = _model_asked(request)
    return route.dialect_for(model.task if model is not None else None)


def _model_asked(request: web.Request) -> Runtime | None:
    """The model a request is for, as far as it is known without failing: a 401 comes before the
    handler has chosen one, and its envelope depends on that model's task all the same."""
    chosen: Runtime | None = request.get(MODEL)
    if chosen is not None:
        return chosen
    models = request.app[MODELS]
    name: str | None = request.match_info.get("model_name")
    try:
        return models.named(name) if name else models.first
    except errors.PipeserveError:  # a name that is not served: its 404 is being answered
        return None


_HTTP_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
}


# --- handlers -------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """200 while every model serves (one that could not load at all is reported, not waited
    for); 503 otherwise. Each model's status is in `models`."""
    models = request.app[MODELS]
    reason = models.unavailable_reason()
    body: dict[str, Any] = {"status": "ready"} if reason is None else {"status": "unavailable", "reason": reason}
    if len(models) > 1:
        body["models"] = models.readiness()
    return json_response(body, 200 if reason is None else 503)


async def info(request: web.Request) -> web.Response:
    """The first model's figures at the top (as with one model), every model's under `models`."""
    models = request.app[MODELS]
    first = models.first
    described = {runtime.name: {"loaded": runtime.loaded, "failed": runtime.failed,
                                **runtime.info()} for runtime in models}
    top = described[first.name]
    counters = {**top["counters"], "connections": dict(vars(models.connections))}  # the server's
    return json_response({**top, "counters": counters, **tei.info_fields(first), "models": described})


async def prometheus_metrics(request: web.Request) -> web.Response:
    body = request.app[MODELS].metrics.render()
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def stats(request: web.Request) -> web.Response:
    """The first model's live figures, or `?model=NAME`'s (request totals and latency are the server's)."""
    models = request.app[MODELS]
    name = request.query.get("model")
    return json_response((models.named(name) if name else models.first).stats())


async def openapi_document(request: web.Request) -> web.Response:
    """The routes this server's model serves (all of them while none has loaded and --task is unset),
    with what they accept here."""
    models = request.app[MODELS]
    runtime = models.first  # the root routes' model
    config = runtime.config
    loaded = runtime.loaded_model()
    ready = loaded.ready if loaded else None
    task = runtime.task
    served = [route for route in ROUTES if route.refusal(ready, task) is None]
    facts = openapi.Facts(model_name=runtime.served_model_name, max_new_tokens=max_new_tokens(runtime),
                          parameters=loaded.schema if loaded else None,
                          open_parameters=loaded.open_parameters if loaded else False,
                          details=ready.details if ready else {}, input_kind=ready.input_kind if ready else None,
                          model_names=tuple(model.name for model in models))
    return json_response(openapi.document(served, bool(config.required_api_key()), facts, task))


class Health(Answer):
    status: Literal["ok"]


class Readiness(Answer):
    status: Literal["ready", "unavailable"]
    reason: str | None = None
    models: dict[str, str] | None = None  # with several models: each one's status


class ServedModel(Answer):
    name: str
    task: str | None
    device: str | None
    dtype: str | None


class Quantiles(Answer):
    count: int
    p50: float | None
    p99: float | None


class WorkerFigures(Answer):
    index: int
    state: str
    pid: int | None
    restarts: int


class Stats(Answer):
    """GET /stats (Runtime.stats): what the page draws."""

    time: float
    uptime_seconds: float
    status: str
    model: ServedModel
    requests: int
    client_errors: int
    server_errors: int
    latency_ms: Quantiles
    time_to_first_token_ms: Quantiles
    window_seconds: float
    generated_tokens: int
    queue_depth: int
    in_flight: int
    batches: int
    items: int
    streams_open: int
    workers: list[WorkerFigures]


OPS = hf.DIALECT  # the operational routes answer errors in pipeserve's own envelope


def _operational(path: str, handler: Handler, summary: str, response: Any, **more: Any) -> Route:
    """A route of the server's own (not a model's): GET, pipeserve's error envelope."""
    return Route("GET", path, handler, summary, OPS, response=response, model_route=False, **more)


OPERATIONS = (
    _operational("/health", health, "The front process is alive", Health, public=True),
    _operational("/ready", ready, "Every model is loaded and serving (503 otherwise)", Readiness, public=True),
    _operational("/info", info, "Models, settings, versions, workers, counters; TEI's fields", dict[str, Any]),
    _operational("/metrics", prometheus_metrics, "Prometheus metrics (text exposition)", str, media="text/plain"),
    _operational("/openapi.json", openapi_document, "This document", dict[str, Any]),
    _operational("/stats", stats, "Live figures for the page: totals, gauges, recent latency quantiles", Stats),
    _operational("/page/{name}", PAGE.asset, "The page's script and style", str, public=True, media="text/plain",
                 documented=False),
)
ROUTES = (*OPERATIONS, *hf.ROUTES, *openai.ROUTES, *completions.ROUTES, *tei.ROUTES, *tgi.ROUTES)
_ROUTE_BY_PATH = {route.path: route for route in ROUTES}
_NAMED = NAMED_PREFIX.replace(":.+", "")  # as aiohttp's canonical path spells it
# What the page's figures count: the routes that ask the model, not probes, scrapes or the page.
_MODEL_ROUTES = (frozenset((route.method, route.path) for route in ROUTES if route.documented)
                 - frozenset((route.method, route.path) for route in OPERATIONS))


def create_app(models: Models) -> web.Application:
    middlewares: list[Any] = [request_id_and_errors, for_browsers]
    api_key = models.config.required_api_key()
    if api_key:
        middlewares.append(require_api_key(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=models.config.max_body_bytes)
    app[MODELS] = models
    app.on_response_prepare.append(_send_request_id)
    add_routes(app, ROUTES, require_task)
    return app


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id on every response as its headers go out: a streamed one sends them before
    its handler returns, so setting it after the handler would be too late for it."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
