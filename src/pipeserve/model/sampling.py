"""Choosing each generated token: greedily, or sampled from the sequence's own seeded generator."""

from __future__ import annotations

from typing import Any

GREEDY_BELOW = 1e-5  # a temperature under this samples as greedy


def samples(parameters: dict[str, Any]) -> bool:
    """Whether a sequence samples its tokens; otherwise it is greedy (temperature 0 is greedy too,
    and so is one too small to divide the logits by without overflowing: vLLM draws the same line)."""
    temperature = parameters.get("temperature")
    return bool(parameters.get("do_sample")) and (temperature is None or temperature >= GREEDY_BELOW)


def sample_one(torch: Any, logits: Any, parameters: dict[str, Any], generator: Any) -> int:
    """A sample after temperature, top-k and top-p, from the sequence's own generator."""
    logits = logits / float(parameters.get("temperature") or 1.0)
    top_k = parameters.get("top_k")
    if top_k:
        threshold = torch.topk(logits, min(int(top_k), logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    top_p = parameters.get("top_p")
    if top_p is not None and 0 < top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        cut = cumulative - torch.softmax(ordered, dim=-1) > top_p  # keep the first token past p
        logits = logits.masked_fill(torch.zeros_like(cut).scatter(0, order, cut), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
