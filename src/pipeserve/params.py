"""Checking request parameters in the front, before they reach the model process.

Names are checked against what the loaded pipeline accepts (it says so in `Ready`). Values of
the parameters that common pipelines document are checked for their type (and, where the set
is closed, their value), so `{"top_k": "three"}` is a 400 naming `top_k` rather than an error
from deep inside the pipeline. Parameters not listed here pass through to the pipeline, which
validates them itself (its ValueError/TypeError also becomes a 400).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from pipeserve import errors

# Pipeline keywords the server sets itself; a client may not override them.
RESERVED = frozenset({"batch_size", "num_workers"})

Check = Callable[[Any], bool]


def _integer(minimum: int) -> tuple[Check, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
            f"an integer >= {minimum}")


def _number() -> tuple[Check, str]:
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
            "a number >= 0")


def _boolean() -> tuple[Check, str]:
    return (lambda v: isinstance(v, bool), "true or false")


def _one_of(*choices: str) -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and v.lower() in choices, "one of " + ", ".join(choices))


def _text_or_texts() -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) or (isinstance(v, list) and bool(v)
                                            and all(isinstance(x, str) for x in v)),
            "a string or a non-empty list of strings")


# The documented parameters of the common tasks, and what their values must be.
_CHECKS: dict[str, tuple[Check, str]] = {
    "top_k": _integer(1),
    "max_new_tokens": _integer(1),
    "max_length": _integer(1),
    "min_new_tokens": _integer(0),
    "num_beams": _integer(1),
    "num_return_sequences": _integer(1),
    "do_sample": _boolean(),
    "return_full_text": _boolean(),
    "multi_label": _boolean(),
    "normalize": _boolean(),
    "truncation": _boolean(),
    "temperature": _number(),
    "top_p": _number(),
    "repetition_penalty": _number(),
    "candidate_labels": _text_or_texts(),
    "targets": _text_or_texts(),
    "hypothesis_template": (lambda v: isinstance(v, str) and "{}" in v, "a string containing {}"),
    "function_to_apply": _one_of("sigmoid", "softmax", "none"),
    "aggregation_strategy": _one_of("none", "simple", "first", "average", "max"),
    "pooling": _one_of("mean", "cls", "max", "none"),
}


def check_parameters(parameters: dict[str, Any], accepted: tuple[str, ...] | None) -> str:
    """Raise BadRequest naming the first bad parameter; return the key that groups batches."""
    for name, value in parameters.items():
        if name in RESERVED:
            raise errors.BadRequest(f"parameter {name!r} is set by the server")
        if accepted is not None and name not in accepted:
            hint = f"; accepted: {', '.join(accepted)}" if accepted else "; this pipeline takes none"
            raise errors.BadRequest(f"unknown parameter {name!r}{hint}")
        check = _CHECKS.get(name)
        if check is not None and value is not None and not check[0](value):
            raise errors.BadRequest(f"parameter {name!r} must be {check[1]}")
    return orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS).decode()
