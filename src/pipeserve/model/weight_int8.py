"""Weight-only int8 for text generation (`--dtype int8` on a generator), in the model process.

Decoding one stream is bound by reading the weights: every step reads each matrix once for a
handful of rows. Stored as int8 with one scale per output channel (symmetric, round to nearest:
the scheme of llama.cpp's q8_0, per row instead of per 32 values), a matrix is half the bytes of
bfloat16's; activations stay in bfloat16. Measured on this project's 2-core bench machine
(AMD EPYC, avx512_bf16), one 768 x 3072 product: 1 row 74 us against bfloat16's 182, 4 rows 138
against 202; the 16384-wide output layer 361 against 1,663 us. torch's int8 kernel costs in
proportion to the rows from 4 on, so a call of more than DIRECT_ROWS rows (a prefill, a wide
decoding step) multiplies by the int8 weights converted to bfloat16 for that call (exact: every
int8 is a bfloat16) and scales the product's output channels after, as the kernel does.

Every Linear layer of the model is quantized (GPT-2's Conv1D too), the output layer included, as
q8_0 does; the input embeddings, norms and attention stay bfloat16. A weight the output layer
shares with the input embeddings is quantized as a copy.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeserve import ipc
from pipeserve.model import precision, prepack
from pipeserve.model.adapters import PipelineCall

log = logging.getLogger("pipeserve.model")

# Rows up to this go through torch's int8 x bfloat16 kernel; more through a bfloat16 product of
# the converted weights. Measured 2026-12-06 (bench/LLAMACPP.md's box, warm weights), 16 rows:
# 3072 x 768 519 us against 445, the 16384-wide output layer 3,202 against 3,138; 8 rows 260
# against 384. Scaling the weights before the product instead (W * s in bfloat16) cost 21.6 ms
# on that output layer at any row count, and rounded each weight.
DIRECT_ROWS = 8

_CLASS: Any = None


def quantize(model: Any, torch: Any) -> list[tuple[Any, str, Any]]:
    """Replace the model's Linear layers with int8 ones, then cast the rest to bfloat16: (parent,
    name, replaced layer) for each, to put back (`prepack.restore`): the replaced layers are untouched."""
    swapped = prepack.swap(model, torch, _layer_class(torch))
    try:
        precision.cast(model, torch.bfloat16)
    except BaseException:
        prepack.restore(swapped)
        raise
    return swapped


def _layer_class(torch: Any) -> Any:
    global _CLASS  # noqa: PLW0603 - made once, when torch is importable
    if _CLASS is not None:
        return _CLASS

    class Int8Linear(torch.nn.Module):  # type: ignore[misc]
        """y = x W^T + b with W as int8 and a bfloat16 scale per output channel."""

        def __init__(self, weight: Any, bias: Any) -> None:  # weight: [out_features, in_features]
            super().__init__()
            self.out_features, self.in_features = weight.shape
            wide = weight.detach().float()
            # The scales are kept in bfloat16 (the kernel's), so the weights are rounded by those.
            scales = (wide.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
            # Not named `weight`: code that reads a layer's weight dtype to cast its input (Mamba's
            # head does) must fail, not cast activations to int8.
            self.register_buffer("qweight", torch.round(wide / scales.float()[:, None]).clamp(-127, 127)
                                 .to(torch.int8).contiguous())
            self.register_buffer("scales", scales)
            self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if rows.shape[0] <= DIRECT_ROWS:
                y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
            else:
                y = torch.nn.functional.linear(rows, self.qweight.to(torch.bfloat16)) * self.scales
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    _CLASS = Int8Linear
    return _CLASS


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
    swapped = len(quantize(call.pipe.model, torch))
    agreement = precision.compare(reference, call(inputs, parameters))
    note = f"weight-only int8 in {swapped} layers, bfloat16 activations"
    if not agreement.same_answers:
        log.warning("--dtype int8: greedy answers differ from float32's (%s)", precision.describe(agreement))
    return ipc.Precision("int8", "int8", candidate="int8", agreement=agreement, note=note)
