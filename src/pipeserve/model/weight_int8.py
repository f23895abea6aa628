"""int8 weights for text generation (`--dtype int8` on a generator), in the model process.

Decoding one stream is bound by reading the weights: every step reads each matrix once for a
handful of rows. Stored as int8 with one scale per output channel (symmetric, round to nearest:
the scheme of llama.cpp's q8_0, per row instead of per 32 values), a matrix is half the bytes of
bfloat16's.

How a layer multiplies depends on the CPU:
- With AVX-512 VNNI (int32 sums of u8 x s8 products), each call's activations are quantised to 8 bits
  per row too, as q8_0 quantises them per 32 values, and fbgemm multiplies int8 by int8
  (torch.ops.quantized.linear_dynamic). Measured on this project's 2-core bench machine (AMD
  EPYC), the 84 matrices of bench/LLAMACPP.md's model with the weights streaming from memory:
  1 row 5.5 ms against 7.8 for the weight-only kernel below, 16 rows 17.5 against 28.8, 32 rows
  27.8 against 37.1. fbgemm quantises a call with one range; see Int8x8Linear for how each row
  still gets its own.
- Without it, activations stay bfloat16 (weight-only): up to DIRECT_ROWS rows torch's
  int8 x bfloat16 kernel, more rows a bfloat16 product of the int8 weights converted for the call
  (exact: every int8 is a bfloat16) with the output channels scaled after, as the kernel does.

Every Linear layer of the model is quantized (GPT-2's Conv1D too), the output layer included, as
q8_0 does. A weight the output layer shares with the input embeddings is quantized as a copy.
The rest of the model (input embeddings, norms, attention, the key/value cache) stays float32
with 8-bit activations and becomes bfloat16 without them:
- fbgemm takes float32 and answers float32, so bfloat16 between the layers only added two
  conversions per product and a rounding of every activation. Measured on bench/LLAMACPP.md's
  model, in-process, median decoding step, bfloat16 -> float32 between the layers (two rounds):
  1 stream 12.4/12.3 -> 10.7/10.8 ms, 4 streams 16.1 -> 15.2, 16 streams 27.8/27.6 ->
  27.7/27.9, 32 streams 43.5/43.1 -> 44.1/45.7 (the cache is read in float32). Greedy agreement
  with float32 on that bench's 8 prompts (share of 64 tokens up to the first divergence): 4.3 %
  -> 5.1 % (22 -> 26 tokens of 512, in-process and through the server alike); llama.cpp's q8_0,
  which keeps its activations float32 too, scored 4.5 % (23).
- The cost is memory: what is not a Linear layer keeps float32's bytes, twice bfloat16's. The
  input embeddings (Llama-3-8B's table: 2.1 GB against 1.05) and, above all, the key/value
  cache (a 7B model with 8 key/value heads, 32 streams of 4k tokens: ~32 GB against ~16) and
  what the prefix cache keeps of it (--prefix-cache-bytes holds half the tokens). A
  --max-worker-memory that fitted bfloat16's may need raising.
- Float32 queries take SDPA's attention, not model/attention.py's products (see there): float32
  attention is batch-invariant with SDPA.
- The weight-only kernel multiplies bfloat16 activations, so without VNNI the model is bfloat16.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from pipeserve import ipc
from pipeserve.model import precision, prepack, siblings
from pipeserve.model.adapters import PipelineCall

log = logging.getLogger("pipeserve.model")

# Weight-only: rows up to this go through torch's int8 x bfloat16 kernel; more through a bfloat16 product of
# the converted weights. Measured 2026-12-06 (bench/LLAMACPP.md's box, warm weights), 16 rows:
# 3072 x 768 519 us against 445, the 16384-wide output layer 3,202 against 3,138; 8 rows 260
# against 384. Scaling the weights before the product instead (W * s in bfloat16) cost 21.6 ms
# on that output layer at any row count, and rounded each weight.
DIRECT_ROWS = 8

_CLASSES: dict[bool, Any] = {}
# What /info's precision note says of the activations, by whether they are quantised.
ACTIVATIONS = {True: "activations quantised to 8 bits per row (VNNI), float32 between the layers",
               False: "bfloat16 activations (weight-only)"}


def quantize(model: Any, torch: Any, activations: bool | None = None) -> prepack.Swapped:
    """Replace the model's Linear layers with int8 ones, the rest in float32 with 8-bit activations
    and in bfloat16 without (see the module doc): (parent, name, replaced layer) for each, to put
    back (`prepack.restore`): the replaced layers are untouched.
    `activations`: quantise each call's activations too; by default where the CPU has AVX-512 VNNI."""
    if activations is None:
        activations = quantizes_activations(torch)
    swapped = siblings.swap(model, torch, _layer_class(torch, activations))
    try:
        precision.cast(model, torch.float32 if activations else torch.bfloat16)
    except BaseException:
        prepack.restore(swapped)
        raise
    return swapped


def quantizes_activations(torch: Any) -> bool:
    """Where the CPU has AVX-512 VNNI and this torch packs for fbgemm (its x86 engine) and still
    ships fbgemm's dynamic int8 product (torch's quantised tensors are deprecated for torchao)."""
    return (precision.has_vnni() and torch.backends.quantized.engine in ("x86", "fbgemm")
            and hasattr(torch.ops.quantized, "linear_dynamic"))


def _int8_rows(weight: Any, torch: Any) -> tuple[Any, Any]:
    """The weight [out, in] as int8 and a float32 scale per output channel (row)."""
    scales = _scales(weight)
    return _rounded(weight, scales, torch), scales


def _scales(weight: Any) -> Any:
    return (weight.detach().float().abs().amax(dim=1) / 127).clamp(min=1e-12)


def _rounded(weight: Any, scales: Any, torch: Any) -> Any:
    return torch.round(weight.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()


def _layer_class(torch: Any, activations: bool) -> Any:
    if activations not in _CLASSES:
        _CLASSES[activations] = _int8x8_class(torch) if activations else _weight_only_class(torch)
    return _CLASSES[activations]


def _weight_only_class(torch: Any) -> Any:
    class Int8Linear(torch.nn.Module):  # type: ignore[misc]
        """y = x W^T + b with W as int8 and a bfloat16 scale per output channel."""

        def __init__(self, weight: Any, bias: Any) -> None:  # weight: [out_features, in_features]
            super().__init__()
            self.out_features, self.in_features = weight.shape
            # The scales are kept in bfloat16 (the kernel's), so the weights are rounded by those.
            scales = _scales(weight).to(torch.bfloat16)
            qweight = _rounded(weight, scales.float(), torch)
            # Not named `weight`: code that reads a layer's weight dtype to cast its input (Mamba's
            # head does) must fail, not cast activations to int8.
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)
            self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
            # torch 2.13's kernel reads past the end of rows whose length is not a multiple of
            # 16 (a segmentation fault for 1, 2, 3, 4, 8, 12, 24 or 33 input features).
            self.direct = self.in_features % 16 == 0

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if rows.shape[0] <= DIRECT_ROWS and self.direct:
                y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
            else:
                y = torch.nn.functional.linear(rows, self.qweight.to(torch.bfloat16)) * self.scales
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return Int8Linear


def _int8x8_class(torch: Any) -> Any:
    linear_dynamic = torch.ops.quantized.linear_dynamic

    class Int8x8Linear(torch.nn.Module):  # type: ignore[misc]
        """y = x W^T + b with W as int8 (a scale per output channel) and x quantised to 8 bits
        per row for the call; fbgemm sums the int8 products in int32.

        fbgemm quantises a whole call with one range, its minimum to its maximum. For two rows
        or more, each row is divided by its largest magnitude and two rows holding 1 and -1 are
        added: the range is then [-1, 1] whatever the rows hold, so a row's integers, their exact
        int32 sums and its outputs are the same beside any other rows. One row alone (a lone
        stream's decoding step) goes in with its negation instead, a symmetric range of its own
        without the scaling's five small operations (1.3-1.7 ms of a 12.5 ms step on
        bench/LLAMACPP.md's model); fbgemm rounds that range's zero point to 127 or 128, so some
        of its outputs differ from the same row's among others by an 8-bit step."""

        def __init__(self, weight: Any, bias: Any) -> None:  # weight: [out_features, in_features]
            super().__init__()
            self.out_features, self.in_features = weight.shape
            qweight, scales = _int8_rows(weight, torch)
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            # torch's quantised tensors announce their move to torchao (a separate package); they
            # still ship, and work, in the torch this project pins.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                quantized = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
            # A TorchScript object, not a tensor (so not in state_dict): the int8 weights in
            # fbgemm's blocked layout.
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
            anchor = torch.zeros(2, self.in_features)
            anchor[:, 0] = torch.tensor([1.0, -1.0])
            # Not persistent: precision.cast leaves such buffers in float32, where the products are.
            self.register_buffer("anchor", anchor, persistent=False)
            # A lone row times these is the row over its negation, in one operation (_alone).
            self.register_buffer("signs", torch.tensor([[1.0], [-1.0]], dtype=torch.float32), persistent=False)
            self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features)
            y = self._alone(rows) if rows.shape[0] == 1 else self._scaled(rows)
            if self.bias is not None:
                y = y + self.bias
            y = y.reshape(*x.shape[:-1], self.out_features)
            # Not .to() unconditionally: a no-op conversion is still a call, 49 a step (lean_decode.py).
            return y if y.dtype == x.dtype else y.to(x.dtype)

        def _scaled(self, rows: Any) -> Any:
            peak = rows.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-30)  # 0 for a padding row
            # A NaN or inf (a diverging stream) would make fbgemm's range NaN and fail the whole
            # call: its row goes in as zeros and comes out non-finite (times its peak), which
            # ends that stream alone.
            scaled = torch.div(rows, peak).nan_to_num_(0.0, 0.0, 0.0)
            return linear_dynamic(torch.cat([scaled, self.anchor]), self.packed, False)[:-2] * peak

        def _alone(self, rows: Any) -> Any:
            try:
                rows = rows if rows.dtype == torch.float32 else rows.float()
                # The row over its negation, in one operation (times 1 and -1 are exact).
                return linear_dynamic(rows * self.signs, self.packed, False)[:1]
            except RuntimeError:  # fbgemm refuses a NaN range: the row's outputs are not numbers
                if bool(torch.isfinite(rows).all()):
                    raise
                return torch.full((1, self.out_features), float("nan"))

    return Int8x8Linear


def apply(call: PipelineCall, device: str, torch: Any) -> ipc.Precision:
    """--dtype int8 on a generator: quantize the float32-loaded model, and say how its greedy
    answers compare with float32's on the check inputs (served either way: the flag asked)."""
    if device != "cpu":
        raise ValueError("--dtype int8 runs on the CPU only; on a GPU use float16 or bfloat16")
    check = call.agreement_inputs(list(precision.CHECK_TEXTS))
    if check is None:
        raise ValueError(f"--dtype int8 is not available for {call.task}")
    inputs, parameters = check
    reference = call(inputs, parameters)
    activations = quantizes_activations(torch)
    swapped = len(quantize(call.pipe.model, torch, activations))
    agreement = precision.compare(reference, call(inputs, parameters))
    note = f"int8 weights in {swapped} layers, {ACTIVATIONS[activations]}"
    if not agreement.same_answers:
        log.warning("--dtype int8: greedy answers differ from float32's (%s)", precision.describe(agreement))
    return ipc.Precision("int8", "int8", candidate="int8", agreement=agreement, note=note)
