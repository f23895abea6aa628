"""What every baseline serves: the embedded all-MiniLM-L6-v2 sentence embedding.

The baselines call the same adapter pipeserve's model process uses (mean pooling over real
tokens, normalised), so every server in the comparison does the same work per request.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pipeserve import ipc
from pipeserve.front.runtime import default_model_path
from pipeserve.model import adapters, loading


def load_embedder(threads: int) -> adapters.BatchCall:
    torch.set_num_threads(threads)
    spec = ipc.WorkerSpec(model=default_model_path(), task=None, pipeline=None, device="cpu",
                          dtype="auto", threads=threads, max_worker_memory=None, log_level="warning")
    call = loading.load_transformers(spec, "cpu", torch, "float32")
    call(["warm up"], {})
    return call


def text_of(document: Any) -> str:
    return document["inputs"] if isinstance(document, dict) else str(document)


def threads_from_env(default: int) -> int:
    return int(os.environ.get("BENCH_THREADS", default))
