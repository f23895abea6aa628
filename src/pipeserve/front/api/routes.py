"""Route declarations: each route's method, path, handler, dialect and body types, declared once.

The handlers decode their bodies with the same types (`contract.decode`), `add_routes` registers
them behind the check of what the served model can do, and `openapi.py` describes them in
`GET /openapi.json`, so the description cannot drift from what the server does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pipeserve.front import errors
from pipeserve.ipc import Ready

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a route needs of the served model beyond its task: None when it serves it, or why not.
Requirement = Callable[[Ready], "str | None"]


@dataclass(frozen=True)
class Dialect:
    """An API dialect's error envelope: the body every error of its routes answers with."""

    name: str
    envelope: errors.Envelope
    error_body: type  # its declaration, for the document


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    dialect: Dialect
    request: Any = None  # the JSON body's declared type (a contract.Body), if it takes one
    response: Any = Any  # the 200 body's declared type
    raw_bodies: tuple[str, ...] = ()  # other media types the body may have (text/plain, ...)
    public: bool = False  # reachable without the API key
    media: str = "application/json"  # the 200 body's media type
    # The server-sent events it answers when asked to stream (text/event-stream): each event's
    # data is one of these types as JSON, or `events_end` (OpenAI's "[DONE]").
    events: tuple[Any, ...] = ()
    events_end: str | None = None
    documented: bool = True  # an API operation in /openapi.json
    # The tasks whose models it serves (any when empty), and what else it needs of the model:
    # checked before the handler reads the body (a 400 saying why), and /openapi.json lists a
    # route only where the model qualifies.
    tasks: tuple[str, ...] = ()
    requires: Requirement | None = None
    # Which model: named in the body's `model` field (OpenAI's), or else by the path
    # (`/models/{name}/...`, where every model route is served too) or the first declared.
    model_field: bool = False
    model_route: bool = True  # False: the server's own (probes, metrics, the document)
    # The JSON body's type for a model of another task (POST / takes TGI's body on a generator).
    request_by_task: Mapping[str, Any] = field(default_factory=dict)
    # Its errors' envelope for a model of another task (POST / answers TGI's on a generator).
    dialect_by_task: Mapping[str, Dialect] = field(default_factory=dict)
    examples: tuple[dict[str, Any], ...] = ()  # valid request bodies, for the document

    def refusal(self, ready: Ready | None, task: str | None = None) -> str | None:
        """Why this route cannot serve this model (None: it can, or nothing is known yet)."""
        task = ready.task if ready is not None else task
        if self.tasks and task is not None and task not in self.tasks:
            return f"{self.path} needs a {' or '.join(self.tasks)} model; this server's model serves {task}"
        if self.requires is not None and ready is not None:
            return self.requires(ready)
        return None

    def request_for(self, task: str | None) -> Any:
        return self.request_by_task.get(task or "", self.request)

    def dialect_for(self, task: str | None) -> Dialect:
        return self.dialect_by_task.get(task or "", self.dialect)

    def events_for(self, task: str | None) -> tuple[Any, ...]:
        """Its events; where a task has its own body (request_by_task), only with that body."""
        if self.request_by_task and task not in self.request_by_task:
            return ()
        return self.events


NAMED_PREFIX = "/models/{model_name:.+}"  # every model route again, for the model named there


def add_routes(app: web.Application, routes: Sequence[Route],
               check: Callable[[Route, web.Request], Awaitable[None]]) -> None:
    """Register each route, a model route behind `check` (its model chosen and able to serve it),
    and again under /models/{name} unless its body names the model; `POST /models/{name}` (the
    Inference API's URL of one model) last, so that it does not take `/models/{name}/embed`."""
    for route in routes:
        app.router.add_route(route.method, route.path, _checked(route, check) if route.model_route else route.handler)
    named = [route for route in routes if route.model_route and not route.model_field]
    for route in sorted(named, key=lambda route: route.path == "/"):
        path = NAMED_PREFIX + (route.path if route.path != "/" else "")
        app.router.add_route(route.method, path, _checked(route, check))


def _checked(route: Route, check: Callable[[Route, web.Request], Awaitable[None]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await check(route, request)
        return await route.handler(request)

    return handler
