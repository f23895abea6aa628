"""`GET /openapi.json`: an OpenAPI 3 description generated from the route declarations.

Each route contributes its request schema (and the raw bodies it also takes), its 200 schema,
and the error statuses it can answer, each in its dialect's envelope.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeserve import __version__
from pipeserve.front.api.routes import Route, Schema, obj

_ERROR_SCHEMAS: dict[str, Schema] = {
    "HfError": obj({"error": {"type": "string"}, "index": {"type": "integer", "minimum": 0}},
                   required=["error"]),
    "OpenAIError": obj({"error": obj({"message": {"type": "string"}, "type": {"type": "string"},
                                      "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
                                     required=["message", "type", "param", "code"])}, required=["error"]),
    "TeiError": obj({"error": {"type": "string"}, "error_type": {"type": "string"}},
                    required=["error", "error_type"]),
}
_ENVELOPES = {"hf": "HfError", "ops": "HfError", "openai": "OpenAIError", "tei": "TeiError"}
# What can go wrong on every model route, and when.
_MODEL_ERRORS = {
    "400": "invalid input or parameters, or a route that does not fit the served task",
    "413": "body over --max-body-bytes, more than --max-items inputs, or an input over --max-input-bytes",
    "500": "inference failed on an input (detail in the server log)",
    "503": "overloaded, loading, restarting, draining, or the model process crashed (see Retry-After)",
    "504": "the request's deadline passed, or its batch ran past --batch-timeout",
}


def _error(dialect: str, description: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{_ENVELOPES[dialect]}"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _operation(route: Route, secured: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', route.path).rstrip('_') or '_root'}",
        "responses": {"200": {"description": "OK", "content": {route.media: {"schema": route.response}}}},
    }
    if route.request is not None:
        content: dict[str, Any] = {"application/json": {"schema": route.request}}
        for media in route.raw_bodies:
            binary = media == "application/octet-stream"
            content[media] = {"schema": {"type": "string", **({"format": "binary"} if binary else {})}}
        operation["requestBody"] = {"required": True, "content": content}
        for status, description in _MODEL_ERRORS.items():
            operation["responses"][status] = _error(route.dialect, description)
    params = re.findall(r"{(\w+)(?::[^}]*)?}", route.path)
    if params:
        operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                    "schema": {"type": "string", "minLength": 1}}
                                   for name in params]
        operation["responses"]["404"] = _error(route.dialect, "no such item")
    if secured and not route.public:
        operation["responses"]["401"] = _error(route.dialect, "missing or invalid API key")
        operation["security"] = [{"bearer": []}]
    return operation


def document(routes: Sequence[Route], secured: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document for these routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route in (route for route in routes if route.documented):
        path = re.sub(r"{(\w+):[^}]*}", r"{\1}", route.path)
        paths.setdefault(path, {})[route.method.lower()] = _operation(route, secured)
    components: dict[str, Any] = {"schemas": _ERROR_SCHEMAS}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0", "info": {"title": "pipeserve", "version": __version__},
            "paths": paths, "components": components}
