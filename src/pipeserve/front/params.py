"""Checking request parameters in the front, against the schema the model process sent in Ready.

Names are checked against what the loaded pipeline takes; values of its documented parameters
against their declared type (and, where the set is closed, their value), so `{"top_k": "three"}`
is a 400 naming `top_k` rather than an error from deep inside the pipeline. Parameters declared
without a type pass through to the pipeline, which validates them itself (its ValueError or
TypeError also becomes a 400).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from pipeserve.front import errors
from pipeserve.ipc import ParamSpec, ParamType

# Pipeline keywords the server sets itself; a client may not override them.
RESERVED = frozenset({"batch_size", "num_workers"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(item, str) for item in value))


# For each type: does a value have it, and how to say what it must be.
_TYPES: dict[ParamType, tuple[Callable[[Any, ParamSpec], bool], Callable[[ParamSpec], str]]] = {
    ParamType.ANY: (lambda v, s: True, lambda s: "any value"),
    ParamType.INTEGER: (lambda v, s: isinstance(v, int) and not isinstance(v, bool),
                        lambda s: "an integer"),
    ParamType.NUMBER: (lambda v, s: _is_number(v), lambda s: "a number"),
    ParamType.BOOLEAN: (lambda v, s: isinstance(v, bool), lambda s: "true or false"),
    ParamType.STRING: (lambda v, s: isinstance(v, str) and (s.contains is None or s.contains in v),
                       lambda s: "a string" + (f" containing {s.contains}" if s.contains else "")),
    ParamType.STRINGS: (lambda v, s: _is_strings(v), lambda s: "a string or a non-empty list of strings"),
    ParamType.CHOICE: (lambda v, s: isinstance(v, str) and v in s.choices,
                       lambda s: "one of " + ", ".join(s.choices)),
    ParamType.OBJECT: (lambda v, s: isinstance(v, dict), lambda s: "an object"),
}


def describe(spec: ParamSpec) -> str:
    """What a value of this parameter must be, e.g. 'an integer >= 1'."""
    text = _TYPES[spec.type][1](spec)
    if spec.minimum is not None and spec.maximum is not None:
        text += f" from {spec.minimum:g} to {spec.maximum:g}"
    elif spec.minimum is not None:
        text += f" >= {spec.minimum:g}"
    elif spec.maximum is not None:
        text += f" <= {spec.maximum:g}"
    return text


# Each type's JSON Schema, for the document (openapi.Facts): the same rules as _TYPES.
_SCHEMAS: dict[ParamType, Callable[[ParamSpec], dict[str, Any]]] = {
    ParamType.ANY: lambda s: {},
    ParamType.INTEGER: lambda s: {"type": "integer"},
    ParamType.NUMBER: lambda s: {"type": "number"},
    ParamType.BOOLEAN: lambda s: {"type": "boolean"},
    ParamType.STRING: lambda s: {"type": "string", **({"pattern": re.escape(s.contains)} if s.contains else {})},
    ParamType.STRINGS: lambda s: {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                                  "minItems": 1}]},
    ParamType.CHOICE: lambda s: {"enum": list(s.choices)},
    ParamType.OBJECT: lambda s: {"type": "object"},
}


def json_schema(spec: ParamSpec) -> dict[str, Any]:
    """The JSON Schema of a value of this parameter (null, "the pipeline's default", included)."""
    schema = _SCHEMAS[spec.type](spec)
    if spec.minimum is not None:
        schema["minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    return {"anyOf": [schema, {"type": "null"}]} if schema else schema


def is_valid(spec: ParamSpec, value: Any) -> bool:
    if not _TYPES[spec.type][0](value, spec):
        return False
    return ((spec.minimum is None or bool(value >= spec.minimum))
            and (spec.maximum is None or bool(value <= spec.maximum)))


def with_integers(parameters: Mapping[str, Any], schema: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """The parameters with an integer parameter's integral float (`2.0`) made an int: JSON
    Schema, and so the document, reads 2.0 as an integer; the pipeline wants an int."""
    def fixed(name: str, value: Any) -> Any:
        spec = schema.get(name)
        if spec is not None and spec.type is ParamType.INTEGER and isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    return {name: fixed(name, value) for name, value in parameters.items()}


def check_parameters(parameters: Mapping[str, Any], schema: Mapping[str, ParamSpec],
                     open_parameters: bool = False) -> str:
    """Raise BadRequest naming the first bad parameter; return the key that groups batches.

    `schema` maps each keyword the pipeline takes to its spec; with `open_parameters` it also
    takes keywords not in it (unchecked). None means "the pipeline's default".
    """
    for name, value in parameters.items():
        if name in RESERVED:
            raise errors.BadRequest(f"parameter {name!r} is set by the server")
        spec = schema.get(name)
        if spec is None:
            if open_parameters:
                continue
            hint = f"; accepted: {', '.join(schema)}" if schema else "; this pipeline takes none"
            raise errors.BadRequest(f"unknown parameter {name!r}{hint}")
        if value is not None and not is_valid(spec, value):
            raise errors.BadRequest(f"parameter {name!r} must be {describe(spec)}")
    return orjson.dumps(dict(parameters), option=orjson.OPT_SORT_KEYS).decode()
