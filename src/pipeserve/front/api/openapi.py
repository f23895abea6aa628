"""`GET /openapi.json`: an OpenAPI 3.1 document written from the route declarations' types.

Each route contributes its request body's type (and the raw bodies it also takes), its 200
body's type, and the error statuses it can answer in its dialect's envelope; msgspec writes the
JSON Schemas. What depends on this server (the served model's name, --max-new-tokens, the loaded
model's parameters and their bounds) is marked in the declarations with `contract.fact` and
filled in here from `Facts`, so the document describes exactly what this server accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeserve import __version__
from pipeserve.front import params
from pipeserve.front.api.contract import FACT_KEY, exact_schemas
from pipeserve.front.api.routes import Route
from pipeserve.ipc import InputKind, ParamSpec

_REFS = "#/components/schemas/{name}"
# What can go wrong on every model route, and when.
_MODEL_ERRORS = {
    "400": "invalid input or parameters (the message names the field), or a route that does not fit the "
           "served model",
    "413": "body over --max-body-bytes, more than --max-items inputs, or an input over --max-input-bytes",
    "500": "inference failed on an input (detail in the server log)",
    "503": "overloaded, loading, restarting, draining, or the model process crashed (see Retry-After)",
    "504": "the request's deadline passed, or its batch ran past --batch-timeout",
}


@dataclass(frozen=True)
class Facts:
    """What this server fills in where a declaration is marked with `contract.fact`.

    `parameters` is None while no model has loaded: the marks then add nothing.
    """

    model_name: str  # the root routes' model
    max_new_tokens: int
    parameters: Mapping[str, ParamSpec] | None = None
    open_parameters: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)  # the loaded model's (Ready.details)
    input_kind: InputKind | None = None
    model_names: tuple[str, ...] = ()  # every model served (several: OpenAI's `model` names one)

    def raw_bodies(self, media: Sequence[str]) -> list[str]:
        """The raw media types the loaded model takes: text, or a file's bytes."""
        if self.input_kind is None:
            return list(media)
        wanted = "text/plain" if self.input_kind is InputKind.TEXT else "application/octet-stream"
        return [kind for kind in media if kind == wanted]

    def resolve(self, name: str) -> dict[str, Any] | None:
        """The schema keywords for the fact `name`; None when no value can be valid here."""
        if name == "model":  # /v1/models/{model}
            return {"enum": list(self.model_names or (self.model_name,))}
        if name == "model_field":  # an OpenAI body's: any name with one model, one of them with several
            return {"enum": list(self.model_names)} if len(self.model_names) > 1 else {}
        if name == "max_new_tokens":
            return {"maximum": self.max_new_tokens}
        if self.parameters is None:
            return {}
        if name == "parameters":
            properties = {spec.name: params.json_schema(spec) for spec in self.parameters.values()
                          if spec.name not in params.RESERVED}
            return {"type": "object", "properties": properties, "additionalProperties": self.open_parameters}
        if name.startswith("taken:"):
            return {} if name.split(":", 1)[1] in self.parameters else None
        if name.startswith("parameter:"):
            spec = self.parameters.get(name.split(":", 1)[1])
            if spec is None:
                return None
            schema = params.json_schema(spec)
            return schema["anyOf"][0] if "anyOf" in schema else schema
        if name == "token_id" and self.details.get("vocab_size"):
            return {"maximum": int(self.details["vocab_size"]) - 1}
        return {}


def _fill(schema: Any, facts: Facts) -> Any:
    """The schema with every fact filled in; None where a fact leaves no valid value."""
    if isinstance(schema, list):
        return [_fill(item, facts) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if FACT_KEY in schema:
        resolved = facts.resolve(schema.pop(FACT_KEY))
        if resolved is None:
            return None
        schema.update(resolved)
    for key, value in list(schema.items()):
        if key == "properties":
            filled = {name: _fill(item, facts) for name, item in value.items()}
            schema[key] = {name: item for name, item in filled.items() if item is not None}
            dropped = set(value) - set(schema[key])
            if dropped and "required" in schema:
                schema["required"] = [name for name in schema["required"] if name not in dropped]
        elif key in ("anyOf", "oneOf"):
            options = [item for item in (_fill(item, facts) for item in value) if item is not None]
            if not options or options == [{"type": "null"}]:
                return None
            schema[key] = options
        elif isinstance(value, (dict, list)) and key not in ("enum", "const", "default", "examples", "required"):
            schema[key] = _fill(value, facts)
    return schema


def _event_schema(payloads: list[Any], end: str | None) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.2's reading, which schemathesis checks): its `data` is
    JSON of one of the payload types, or the stream's end marker."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": {"anyOf": payloads}}
    if end is not None:
        data = {"anyOf": [{"const": end}, data]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _error(route: Route, task: str | None, description: str) -> dict[str, Any]:
    ref = {"$ref": _REFS.format(name=route.dialect_for(task).error_body.__name__)}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _operation(route: Route, secured: bool, schemas: Mapping[Any, Any], task: str | None,
               facts: Facts) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', route.path).rstrip('_') or '_root'}",
        "responses": {"200": {"description": "OK", "content": {route.media: {"schema": schemas[route.response]}}}},
    }
    events = route.events_for(task)
    if events:
        operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": _event_schema(
            [schemas[kind] for kind in events], route.events_end)}
    request = route.request_for(task)
    if request is not None:
        body: dict[str, Any] = {"schema": schemas[request]}
        if route.examples:
            body["examples"] = {f"example{index}": {"value": value} for index, value in enumerate(route.examples)}
        content: dict[str, Any] = {"application/json": body}
        for media in facts.raw_bodies(route.raw_bodies):
            binary = media == "application/octet-stream"
            content[media] = {"schema": {"type": "string", "minLength": 1, **({"format": "binary"} if binary else {})}}
        operation["requestBody"] = {"required": True, "content": content}
        for status, description in _MODEL_ERRORS.items():
            operation["responses"][status] = _error(route, task, description)
    names = re.findall(r"{(\w+)(?::[^}]*)?}", route.path)
    if names:
        operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                    "schema": {"type": "string", "minLength": 1, FACT_KEY: name}}
                                   for name in names]
        operation["responses"]["404"] = _error(route, task, "no such item")
    if secured and not route.public:
        operation["responses"]["401"] = _error(route, task, "missing or invalid API key")
        operation["security"] = [{"bearer": []}]
    return operation


def document(routes: Sequence[Route], secured: bool, facts: Facts, task: str | None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for these routes, as this server serves them."""
    routes = [route for route in routes if route.documented]
    types = list(dict.fromkeys(
        [route.request_for(task) for route in routes if route.request_for(task) is not None]
        + [route.response for route in routes] + [route.dialect_for(task).error_body for route in routes]
        + [kind for route in routes for kind in route.events_for(task)]))
    inline, components = msgspec.json.schema_components(types, ref_template=_REFS)
    for name, (fields, rules) in exact_schemas().items():
        if name in components:
            components[name]["properties"].update(fields)
            components[name].update(rules)
    schemas = dict(zip(types, inline, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = re.sub(r"{(\w+):[^}]*}", r"{\1}", route.path)
        paths.setdefault(path, {})[route.method.lower()] = _operation(route, secured, schemas, task, facts)
    parts: dict[str, Any] = {"schemas": components}
    if secured:
        parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    filled = _fill({"paths": paths, "components": parts}, facts)
    return {"openapi": "3.1.0", "info": {"title": "pipeserve", "version": __version__}, **filled}
