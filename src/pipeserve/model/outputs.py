"""Pipeline outputs made plain before they cross the pipe.

Tensors become numpy arrays (so unpickling in the front never imports torch), numpy scalars
become Python numbers. The front writes the arrays to JSON natively (front/jsonio.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
