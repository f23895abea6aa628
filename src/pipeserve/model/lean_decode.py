"""Decoding steps of Llama-shaped generators without transformers' per-call machinery.

A decoding step multiplies one row per stream by every matrix of the model. For one stream the
products cannot get much cheaper: they read every weight once, at this machine's memory speed
(bench/LLAMACPP.md's model in int8, 2 cores: the 49 products alone take 5-7 ms, about what
llama-server's whole q8_0 step takes). What is left is the Python around them: transformers'
model, layer and attention modules, each call's keyword handling, the attention mask built and
checked every step, the output objects. On that model, in-process, a lone stream's int8 step
with its products made free took 3.4-4.2 ms through transformers and 2.4-3.0 ms through this
path, and the whole step 0.87x transformers' (the same tokens, bit for bit; five interleaved
rounds; bench/DECODE_STEP.md).

This path runs the same computation, in the same order, on the model's own modules: each layer's
RMS norms (torch's fused rms_norm where it gives the module's output bit for bit: in float32),
its q/k/v projections, the rotary embedding (in fewer operations, to the same numbers: _rotated),
the cache's update, the model's attention function (SDPA, or model/attention.py's), the output
projection and the gated MLP, then the final norm and the head. It covers only one-token steps
on the engine's growing cache; prompts, and every other step, go through transformers.

A model qualifies by its shape (Llama, Mistral, Qwen2 and models built like them: layers of
exactly self_attn, mlp and two norms; attention of exactly q/k/v/o projections; a gated MLP) and
by a check at load: through this path, a decoding step on a probe, one row and then two rows (one
left-padded), must give transformers' own logits and keys and values bit for bit. A model that
differs anywhere (Gemma's scaled embeddings and offset norms, Granite's multipliers, a softcap,
layers without rotary embeddings) fails the shape test or the check and keeps transformers'
forward.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeserve.model import kv_cache

log = logging.getLogger("pipeserve.model")

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PRODUCTS = {"gate_proj", "up_proj", "down_proj"}
# Attention functions whose mask for a one-token step is the padding mask as booleans (None
# without padding): SDPA's, which model/attention.py's registers as its own.
MASKED_AS_SDPA = ("sdpa", "pipeserve_sdpa")
PROBE_IDS = [1, 2, 3, 4]


def verified(model: Any, torch: Any) -> LeanDecode | None:
    """The lean path for this model where it gives transformers' answers bit for bit; else None
    (and the model is served through transformers' forward, whatever failed here)."""
    try:
        with torch.inference_mode():
            if not shaped(model) or not kv_cache.stacks(model, PROBE_IDS[:1], model.device):
                return None  # not built like a Llama, or a cache that cannot grow (the engine's static batches)
            lean = LeanDecode(model, torch, fused_norms=all(_fuses(norm, torch) for norm in _norms(model)))
        same = all(_same_step(model, torch, lean, rows) for rows in (1, 2))
    except Exception as exc:  # noqa: BLE001 - any failure keeps transformers' forward
        log.info("decoding steps stay with transformers: the check failed (%s)", type(exc).__name__)
        _forget_stacked(model)
        return None
    if not same:
        log.info("decoding steps stay with transformers: a lean step's answers differed from transformers'")
        return None
    log.info("decoding steps skip transformers' per-layer calls (%s norms)", "fused" if lean.fused_norms else "own")
    return lean


def _norms(model: Any) -> list[Any]:
    return [model.model.norm] + [norm for layer in model.model.layers
                                 for norm in (layer.input_layernorm, layer.post_attention_layernorm)]


def _fuses(norm: Any, torch: Any) -> bool:
    """Whether torch's fused rms_norm gives this norm's outputs bit for bit (float32: yes; bfloat16:
    no, the module rounds before its weight), on rows wide apart in scale. On a CPU only: torch
    2.13's CPU rms_norm is the module's own operations composed, while CUDA's fused kernel may
    reduce otherwise at another number of rows than tried here."""
    if norm.weight.device.type != "cpu":
        return False
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn((64, norm.weight.shape[0]), generator=generator)
    rows = (rows * torch.logspace(-3, 3, 64)[:, None]).to(norm.weight.dtype)
    fused = torch.nn.functional.rms_norm(rows, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return bool(torch.equal(fused, norm.forward(rows)))


def _forget_stacked(model: Any) -> None:
    """A check that failed midway may leave a stacked group's product waiting for members never
    called (model/siblings.py's Shared, reached by duck type: siblings imports what imports this):
    dropped, or its next call would warn of different inputs."""
    for module in model.modules():
        forget = getattr(getattr(module, "shared", None), "forget", None)
        if callable(forget):
            forget()


def shaped(model: Any) -> bool:
    """Whether the model is built like a Llama, with no hooks: transformers' calls run a module's
    hooks, and accelerate's (device_map offloading) replace a module's forward; this path would
    skip both."""
    import torch  # noqa: PLC0415

    inner = getattr(model, "model", None)
    if inner is None or getattr(model, "lm_head", None) is None:
        return False
    if not all(hasattr(inner, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if getattr(model.config, "_attn_implementation", None) not in MASKED_AS_SDPA:
        return False
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    if any(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
           or "forward" in vars(module) for module in model.modules()):
        return False
    return _rms_norm(inner.norm) and all(_layer_shaped(layer) for layer in inner.layers)


def _rms_norm(norm: Any) -> bool:
    return getattr(norm, "weight", None) is not None and hasattr(norm, "variance_epsilon")


def _layer_shaped(layer: Any) -> bool:
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (_children(layer) == LAYER_PARTS and _children(attention) == ATTENTION_PARTS
            and MLP_PRODUCTS <= _children(mlp) <= MLP_PRODUCTS | {"act_fn"} and callable(getattr(mlp, "act_fn", None))
            and all(hasattr(attention, name) for name in ("head_dim", "scaling"))
            and _rms_norm(layer.input_layernorm) and _rms_norm(layer.post_attention_layernorm))


def _children(module: Any) -> set[str]:
    return {name for name, _ in module.named_children()} if module is not None else set()


class LeanDecode:
    """One decoding step: (ids [rows, 1], padding mask [rows, columns] with the step's column,
    positions [rows, 1], the cache) -> logits [rows, 1, vocabulary]; the cache grows in place."""

    def __init__(self, model: Any, torch: Any, fused_norms: bool) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415

        self.torch = torch
        self.model = model
        self.inner = model.model
        self.fused_norms = fused_norms
        self.attend = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]

    def __call__(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        torch, inner = self.torch, self.inner
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), _signed(torch, sin.unsqueeze(1))  # over the heads
        attention_mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        rows = ids.shape[0]
        for index, layer in enumerate(inner.layers):
            attention = layer.self_attn
            x = self._norm(layer.input_layernorm, hidden)
            # [rows, heads, 1, dim]: transformers' view and transpose, in one view for one position.
            heads = (rows, -1, 1, attention.head_dim)
            query = attention.q_proj.forward(x).view(heads)
            key = attention.k_proj.forward(x).view(heads)
            value = attention.v_proj.forward(x).view(heads)
            query, key = _rotated(query, cos, sin), _rotated(key, cos, sin)
            key, value = cache.update(key, value, index)
            output, _ = self.attend(attention, query, key, value, attention_mask, dropout=0.0,
                                    scaling=attention.scaling)
            hidden = hidden + attention.o_proj.forward(output.reshape(rows, 1, -1).contiguous())
            x = self._norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            hidden = hidden + mlp.down_proj.forward(mlp.act_fn(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))
        return self.model.lm_head.forward(self._norm(inner.norm, hidden))

    def _norm(self, norm: Any, hidden: Any) -> Any:
        if self.fused_norms:
            return self.torch.nn.functional.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)
        return norm.forward(hidden)


def _signed(torch: Any, sin: Any) -> Any:
    """sin with its first half negated, for _rotated, once a step."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotated(states: Any, cos: Any, signed_sin: Any) -> Any:
    """transformers' apply_rotary_pos_emb for one of query or key, x cos + rotate_half(x) sin, in
    four operations instead of seven: rotate_half(x) = (-x2, x1) is x rolled by half, (x2, x1),
    with the first half's sign moved onto sin's (-x2 * s1 and x2 * -s1 are the same number)."""
    return states * cos + states.roll(states.shape[-1] // 2, -1) * signed_sin


def _same_step(model: Any, torch: Any, lean: LeanDecode, rows: int) -> bool:
    """Prefill the probe (rows after the first left-padded by one), then one decoding step through
    transformers and one through `lean`, each on its own copy of the cache: the same logits and
    the same keys and values?"""
    lengths = [len(PROBE_IDS) - row for row in range(rows)]
    ids = torch.tensor([[0] * (len(PROBE_IDS) - length) + PROBE_IDS[:length] for length in lengths],
                       device=model.device)
    mask = torch.tensor([[0] * (len(PROBE_IDS) - length) + [1] * length for length in lengths], device=model.device)
    with torch.inference_mode():
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=kv_cache.positions(mask), use_cache=True)
        theirs = kv_cache.cache_of(prefill)
        kv_cache.grow_in_place(theirs, rows)
        ours = kv_cache.past([[(layer.keys, layer.values) for layer in theirs.layers]], len(PROBE_IDS))  # a copy
        step = prefill.logits[:, -1:].argmax(dim=-1)
        positions = mask.sum(dim=-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        expected = model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{kv_cache.keyword(model): theirs}).logits
        got = lean(step, mask, positions, ours)
    return bool(torch.equal(got, expected)) and all(
        torch.equal(mine.keys, their.keys) and torch.equal(mine.values, their.values)
        for mine, their in zip(ours.layers, theirs.layers, strict=True))
