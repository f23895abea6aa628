"""Pipeline outputs: made plain in the model process, serialised to JSON in the front.

`to_plain` runs in the model process: tensors become numpy arrays (so unpickling in the front
never imports torch), numpy scalars become Python numbers. `dumps` runs in the front: orjson
writes numpy arrays natively, without a round trip through Python lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def to_plain(value: Any) -> Any:
    """Tensors -> contiguous numpy arrays, numpy scalars -> Python; containers recursively."""
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return _plain_array(value)
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if tensor.dtype.is_floating_point and tensor.dtype.itemsize < 4:
            tensor = tensor.float()  # bfloat16 has no numpy dtype
        return _plain_array(tensor.numpy())
    return value


def _plain_array(array: np.ndarray) -> Any:
    if array.ndim == 0:
        return array.item()
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


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
    return orjson.dumps(value, default=_fallback, option=_ORJSON_OPTIONS)
