"""Accuracy beside speed: a server's sentence vectors against an fp32 in-process reference.

The reference is all-MiniLM-L6-v2's sentence-transformers recipe done by hand: transformers
AutoModel + AutoTokenizer in float32, mean pooling over the attention mask, L2 normalisation.
A server's vectors for the same texts are compared row by row (cosine after normalising both);
a mean cosine of 1.0000 means the server computes what the model's authors meant.

    python bench/accuracy.py --model DIR                       # reference only: shape and norm
    python bench/accuracy.py --model DIR --port 8000 --style openai
    python bench/accuracy.py --model DIR --port 7997 --style openai --path /embeddings
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import make_texts

ACCURACY_SEED = 20261129  # not the load's seed: the accuracy texts are not the measured requests
TEXTS: list[str] = make_texts(256, seed=ACCURACY_SEED)
BATCH = 32
STYLES: dict[str, str] = {"openai": "/v1/embeddings", "tei": "/embed", "hf": "/"}


def max_length(model_dir: str, tokenizer_max: int) -> int:
    """Truncation length: the sentence-transformers folder's max_seq_length, else the model's (<=512)."""
    limit = min(int(tokenizer_max), 512) if tokenizer_max else 512
    config = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(config):
        with open(config) as handle:
            declared = json.load(handle).get("max_seq_length")
        if declared:
            limit = min(limit, int(declared))
    return limit


def reference_vectors(model_dir: str, texts: Sequence[str], device: str = "cpu") -> np.ndarray:
    """fp32 sentence vectors computed in this process: [len(texts), hidden], unit length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    limit = max_length(model_dir, tokenizer.model_max_length)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 on a GPU: this is the fp32 reference
    try:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = tokenizer(list(texts[start:start + BATCH]), padding=True, truncation=True,
                                  max_length=limit, return_tensors="pt").to(device)
                tokens = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy())
    finally:
        torch.set_float32_matmul_precision(previous)
    return np.concatenate(rows).astype(np.float32)


def _post(url: str, body: dict[str, Any], timeout: float) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _rows(answer: Any, style: str, count: int) -> np.ndarray:
    """The vectors of one answer, in input order, as [count, hidden]."""
    if style == "openai":
        data = sorted(answer["data"], key=lambda item: item["index"])
        vectors = np.asarray([item["embedding"] for item in data], dtype=np.float32)
    else:
        vectors = np.asarray(answer, dtype=np.float32)
        if vectors.ndim == 1 and count == 1:  # a single text's answer: one vector
            vectors = vectors[None]
        if vectors.ndim == 3 and vectors.shape[1] == 1:  # one [1, hidden] per input
            vectors = vectors[:, 0]
    if vectors.shape[0] != count or vectors.ndim != 2:
        raise ValueError(f"expected {count} pooled vectors, got an array of shape {vectors.shape}")
    return vectors


def server_vectors(port: int, texts: Sequence[str], style: str, path: str | None = None,
                   model: str = "minilm", timeout: float = 60.0, batch_size: int = BATCH) -> np.ndarray:
    """The vectors a server on 127.0.0.1:port answers for `texts`, in batches of `batch_size`
    (1: one text per request, as a string, for servers that take nothing else)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}")
    url = f"http://127.0.0.1:{port}{path or STYLES[style]}"
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        inputs: str | list[str] = batch[0] if batch_size == 1 else batch
        body: dict[str, Any] = ({"input": inputs, "model": model, "encoding_format": "float"}
                                if style == "openai" else {"inputs": inputs})
        rows.append(_rows(_post(url, body, timeout), style, len(batch)))
    return np.concatenate(rows)


def agreement(vectors: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Row-wise cosine of two [n, hidden] arrays, each row normalised first: mean and min."""
    if vectors.shape != reference.shape:
        raise ValueError(f"shapes differ: {vectors.shape} vs {reference.shape}")

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return np.asarray(rows / norms, dtype=np.float64)

    cosines = (unit(vectors) * unit(reference)).sum(axis=1)
    return {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder for the fp32 reference")
    parser.add_argument("--device", default="cpu", help="where the reference runs (cpu, cuda)")
    parser.add_argument("--port", type=int, help="a running server to compare (else: reference only)")
    parser.add_argument("--style", choices=sorted(STYLES), default="openai")
    parser.add_argument("--path", help="override the style's path (e.g. /embeddings for infinity)")
    parser.add_argument("--served-model", default="minilm", help="the 'model' field of openai requests")
    args = parser.parse_args()
    reference = reference_vectors(args.model, TEXTS, args.device)
    result: dict[str, Any] = {"texts": len(TEXTS), "shape": list(reference.shape),
                              "mean_norm": float(np.linalg.norm(reference, axis=1).mean())}
    if args.port:
        vectors = server_vectors(args.port, TEXTS, args.style, args.path, args.served_model)
        result.update(agreement(vectors, reference))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
