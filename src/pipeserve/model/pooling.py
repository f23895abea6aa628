"""Sentence embeddings: the pooling a sentence-transformers model ships, applied to token vectors.

Runs in the model process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SentencePooling:
    """How a sentence-transformers model turns token vectors into one sentence vector."""

    mode: str = "none"
    normalize: bool = False
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)  # name -> text put before an input


def read_sentence_pooling(model: str) -> SentencePooling:
    """The pooling a sentence-transformers folder ships (modules.json, 1_Pooling/config.json)."""
    modules_path = os.path.join(model, "modules.json")
    if not os.path.isfile(modules_path):
        return SentencePooling()
    with open(modules_path) as handle:
        modules = json.load(handle)
    mode, normalize = "none", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            with open(os.path.join(model, module.get("path", ""), "config.json")) as handle:
                config = json.load(handle)
            for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                              ("pooling_mode_max_tokens", "max")):
                if config.get(key):
                    mode = name
                    break
    max_seq_length = None
    bert_config = os.path.join(model, "sentence_bert_config.json")
    if os.path.isfile(bert_config):
        with open(bert_config) as handle:
            max_seq_length = json.load(handle).get("max_seq_length")
    prompts: dict[str, str] = {}
    st_config = os.path.join(model, "config_sentence_transformers.json")
    if os.path.isfile(st_config):
        with open(st_config) as handle:
            prompts = {str(k): str(v) for k, v in (json.load(handle).get("prompts") or {}).items()}
    return SentencePooling(mode, normalize, max_seq_length, prompts)


def truncate(vector: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """The first `dimensions` values of each vector (a sentence's, or each token's when not
    pooled), re-normalised (Matryoshka models)."""
    if dimensions > vector.shape[-1]:
        raise ValueError(f"dimensions must be at most {vector.shape[-1]}, the model's embedding size")
    cut = vector[..., :dimensions]
    if normalize:
        cut = cut / np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)
    return np.ascontiguousarray(cut, dtype=np.float32)


def pool(tokens: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """tokens: [1, T, H] for one input -> [H] (or [1, T, H] for "none"), optionally unit length."""
    if mode == "mean":
        vector = tokens[0].mean(axis=0)
    elif mode == "cls":
        vector = tokens[0, 0]
    elif mode == "max":
        vector = tokens[0].max(axis=0)
    else:
        vector = tokens
    if normalize:
        norm = np.linalg.norm(vector, axis=-1, keepdims=True)
        vector = vector / np.maximum(norm, 1e-12)
    return np.ascontiguousarray(vector, dtype=np.float32)
