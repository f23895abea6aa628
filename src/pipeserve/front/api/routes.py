"""Route declarations: each route's method, path, handler, and JSON schemas, declared once.

The handlers parse their bodies against the same declaration (`parse_object`: unknown and
missing fields), `add_routes` registers them, and `openapi.py` describes them in
`GET /openapi.json`, so the description cannot drift from what the server does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from pipeserve.front import errors

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]
ANY_JSON: Schema = {}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    dialect: str  # hf, openai, tei or ops: which error envelope it answers in
    request: Schema | None = None  # the JSON body's schema (an object), if it takes one
    response: Schema = field(default_factory=dict)  # the 200 body's schema
    raw_bodies: tuple[str, ...] = ()  # other media types the body may have (text/plain, ...)
    public: bool = False  # reachable without the API key
    media: str = "application/json"  # the 200 body's media type
    documented: bool = True  # in /openapi.json (the page's routes are for browsers, not API clients)
    # The tasks whose models it serves (any when empty): checked before the handler reads the
    # body (a 400 naming them), and /openapi.json lists a route only for a model it serves.
    tasks: tuple[str, ...] = ()

    def serves(self, task: str | None) -> bool:
        """Whether this route serves a model of `task` (None: not known yet, so any)."""
        return not self.tasks or task is None or task in self.tasks


def add_routes(app: web.Application, routes: Sequence[Route],
               task_check: Callable[[Route, web.Request], None]) -> None:
    """Register each route; one whose tasks are declared runs `task_check` before its handler."""
    for route in routes:
        app.router.add_route(route.method, route.path, _checked(route, task_check) if route.tasks else route.handler)


def _checked(route: Route, task_check: Callable[[Route, web.Request], None]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        task_check(route, request)
        return await route.handler(request)

    return handler


def obj(properties: dict[str, Schema], required: Sequence[str] = ()) -> Schema:
    """An object schema that refuses fields it does not name."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# A text, or a non-empty list of texts: how every dialect's inputs field is declared.
TEXTS: Schema = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}


def texts(value: Any, field: str, hint: str = "") -> tuple[list[str], bool]:
    """(texts, single) from a field declared as TEXTS; token ids get a 400 that says so (+ hint)."""
    if isinstance(value, str):
        return [value], True
    if not isinstance(value, list):
        raise errors.BadRequest(f'"{field}" must be a string or a list of strings, not {json_type(value)}')
    if not value:
        raise errors.BadRequest(f'"{field}" is an empty list')
    for index, item in enumerate(value):
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise errors.BadRequest(f'"{field}" as token ids is not served: send the texts{hint}')
        if not isinstance(item, str):
            raise errors.BadRequest(f'"{field}"[{index}] must be a string, not {json_type(item)}')
    return value, False


def load_json_object(body: bytes, expected: str) -> dict[str, Any]:
    """The JSON object a body holds, or BadRequest saying what was expected."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise errors.BadRequest(f"JSON body must be an object: {expected}")
    return document


def parse_object(body: bytes, schema: Schema) -> dict[str, Any]:
    """A JSON body as the route declares it: an object, its required fields, no unknown ones."""
    return check_object(load_object(body, schema), schema)


def load_object(body: bytes, schema: Schema) -> dict[str, Any]:
    """The JSON object a body holds (its fields not checked yet), or a 400 with an example."""
    example = "{" + ", ".join(f'"{name}": ...' for name in schema.get("required", [])) + "}"
    return load_json_object(body, example)


def check_object(document: dict[str, Any], schema: Schema) -> dict[str, Any]:
    """A parsed object as `schema` declares it: its required fields, no unknown ones."""
    properties = schema["properties"]
    required = schema.get("required", [])
    unknown = sorted(set(document) - set(properties))
    if unknown:
        raise errors.BadRequest(f"unknown field {unknown[0]!r}; expected {', '.join(sorted(properties))}")
    for name in required:
        if name not in document:
            raise errors.BadRequest(f'missing "{name}"')
    return document


def boolean(document: dict[str, Any], name: str, default: bool) -> bool:
    value = document.get(name, default)
    if not isinstance(value, bool):
        raise errors.BadRequest(f'"{name}" must be true or false, not {json_type(value)}')
    return value
