"""Attention for one-token queries (decoding steps) on a CPU: two batched matrix products.

torch's scaled_dot_product_attention on a CPU runs a flash-attention kernel made for long
queries; for a decoding step's single query per row it is slow in bfloat16: 3.3 ms against
1.0 ms for these products (in float32: scores = q K^T, softmax, then P V), one layer of 32 rows
x 12 heads x 120 positions. Through the engine on this project's 2-core bench machine
(bench/llamacpp's GPT-2-small-cost Llama, bfloat16), whole decoding steps against SDPA's: 32
rows 74-91 against 91-105 ms, 4 rows 24-28 against 25-30, 1 row even (25.8-26.3 against
25.2-26.2, weights not packed); 32 rows of ~900 positions 494-499 against 610-628 ms (one
layer's attention alone: 12.5 against 23.7 ms; both in slices of 8 MiB, 7.7 ms a layer in the
16 MiB of CHUNK_BYTES). In float32 no better at any width, so float32 keeps SDPA.

It takes every reduced-precision one-token step (not int8 with 8-bit activations: float32
between its products, model/weight_int8.py), whatever its width, because its rounding is
not SDPA's: when it took only steps of 8 rows or more, a stream's algorithm changed with the
number of streams beside it. bench/BATCH_INVARIANCE.md (a 4-layer random Llama, 40 greedy
tokens): bfloat16 streams decoded beside 23 others took other tokens than alone for 11 of 24
prompts under that rule, 9 of 24 taking every step, 6 of 24 with SDPA everywhere: bfloat16
attention over left-padded rows is not invariant to the padding with either; float32 0 of 24.
Prompts (queries of many tokens) and what this path does not cover (a softcap, a position bias,
a GPU) keep SDPA.

Registered with transformers as "pipeserve_sdpa" (with SDPA's mask), and set only where the
model used "sdpa".
"""

from __future__ import annotations

from typing import Any

NAME = "pipeserve_sdpa"
CHUNK_BYTES = 16 * 2**20  # float32 keys and values converted at once (8, 16, 32, 64 MiB measured: 16 best overall)
_REGISTERED = False


def use_for_decoding(model: Any) -> bool:
    """Switch the model's SDPA attention to this one; whether it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True


def register() -> None:
    """Make "pipeserve_sdpa" known to transformers (once per process)."""
    global _REGISTERED  # noqa: PLW0603 - once per process
    if _REGISTERED:
        return
    from transformers import AttentionInterface, AttentionMaskInterface  # noqa: PLC0415
    from transformers.masking_utils import sdpa_mask  # noqa: PLC0415

    AttentionInterface.register(NAME, attend)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _REGISTERED = True


def attend(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
           scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract: query [batch, heads, q, dim], key and value
    [batch, kv_heads, kv, dim]; answers [batch, q, heads, dim]."""
    import torch  # noqa: PLC0415
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    if (query.shape[2] != 1 or query.dtype == torch.float32 or dropout
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or query.device.type != "cpu"):
        answer: tuple[Any, None] = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                          dropout=dropout, scaling=scaling, **kwargs)
        return answer

    # In float32 throughout, as SDPA's kernel accumulates, a few rows at a time: float32 copies of
    # a wide step's whole cache (32 rows x 1,000 positions: 98 MB a layer) cost more to allocate
    # and fill than the products (70 ms against 7.7 ms in slices of CHUNK_BYTES; SDPA 24 ms). A
    # row's answer is the same in any slice (each row's products are separate matrices).
    per_row = key.shape[1] * key.shape[2] * (key.shape[3] + value.shape[3]) * 4
    rows = max(1, CHUNK_BYTES // per_row)
    batch = query.shape[0]
    if attention_mask is not None and attention_mask.shape[0] != batch:
        attention_mask = attention_mask.expand(batch, *attention_mask.shape[1:])
    answers = [_attend_rows(torch, query[start:start + rows], key[start:start + rows], value[start:start + rows],
                            None if attention_mask is None else attention_mask[start:start + rows], scaling)
               for start in range(0, batch, rows)]
    return (answers[0] if len(answers) == 1 else torch.cat(answers)), None


def _attend_rows(torch: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None) -> Any:
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # Grouped heads (GQA) share their key and value: [batch, kv_heads, group, dim] each.
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scale = scaling if scaling is not None else dim ** -0.5
    # bfloat16 scores or weights (rounded as they left a bfloat16 product) changed greedy tokens.
    scores = torch.matmul(grouped.float(), key.float().transpose(-1, -2)) * scale  # [batch, kv_heads, group, kv]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    output = torch.matmul(weights, value.float()).to(value.dtype)  # [batch, kv_heads, group, value dim]
    return output.reshape(batch, 1, heads, value.shape[-1])
