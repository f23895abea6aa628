"""JSON for response bodies: orjson, which writes numpy arrays natively (no Python lists)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from aiohttp import web

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """JSON bytes for a response body."""
    return orjson.dumps(value, default=_fallback, option=_OPTIONS)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, headers=headers,
                        content_type="application/json")
