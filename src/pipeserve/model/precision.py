"""`--dtype auto`: the reduced precision the hardware runs natively, kept only where it agrees with fp32.

Runs in the model process. bfloat16 halves the bytes every matrix product reads, and on a CPU
with avx512_bf16 or AMX, or on a GPU, the products run natively in it: all-MiniLM-L6-v2 served
1.2–2x faster here. Elsewhere bf16 is emulated and slower than fp32. Speed is not enough, so the
model is loaded in float32, answers a fixed set of inputs, is cast to the reduced dtype, answers
them again, and keeps the reduced dtype only when the two agree (`agrees`); otherwise it is cast
back from a saved float32 copy and the log says why.

The rule (`agrees`): every string and integer of each answer is identical (labels, entity words
and offsets, the greedily generated text, i.e. the same greedy tokens), and every float vector
(an embedding) points the same way: mean cosine ≥ 0.9999 over the inputs and none below 0.999.
Scalar scores are not compared; their ranking is, through the labels' order. The per-input floor
sits below the mean's because the shortest inputs vary most: all-MiniLM-L6-v2 in bf16 gave mean
0.99995 and minimum 0.99990 over 512 bench texts.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeserve import ipc
from pipeserve.model.adapters import BatchCall

log = logging.getLogger("pipeserve.model")

MEAN_COSINE = 0.9999
MIN_COSINE = 0.999
# --dtype int8 is opt-in and lossier; its floor (bench/QUANTIZATION.md: per-channel weights and
# 8-bit activations measured mean 0.991, min 0.973 on 512 bench texts).
INT8_MEAN_COSINE = 0.99
INT8_MIN_COSINE = 0.97
# fbgemm's int8 kernels sum u8 x s8 products in int32 only with AVX-512 VNNI (AMX CPUs have it
# too); on others, AVX-VNNI alone (Alder Lake, Sierra Forest) included, they add pairs in int16,
# which 8-bit activations saturate.
_VNNI_CPU_FLAGS = frozenset({"avx512_vnni"})
# Short and long, plain and odd: where rounding shows first. The long one reaches a few hundred
# tokens, where errors accumulate over positions.
CHECK_TEXTS = (
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Where is the nearest train station, and when does the last train leave tonight?",
    "Quarterly revenue rose 12% to $4.2 billion, beating analysts' estimates of $3.9 billion.",
    "def add(a, b):\n    return a + b  # numbers, symbols & code: 3.14159, 2**10 == 1024",
    "Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits de Paris.",
    "I absolutely loved this film; the acting was superb, though the ending felt rushed.",
    " ".join(["Long inputs accumulate rounding error over many positions and layers."] * 30),
)
_NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def native_reduced_dtype(device: str, torch: Any, cpuinfo: Path = CPUINFO) -> str | None:
    """The reduced dtype this device computes natively, or None where only float32 is native."""
    if device.startswith("cuda"):
        # Not counting emulation: a V100 or T4 "supports" bf16 only by emulating it, slowly.
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if device == "cpu" and cpu_flags(cpuinfo) & _NATIVE_BF16_CPU_FLAGS:
        return "bfloat16"
    return None


def has_vnni(cpuinfo: Path = CPUINFO) -> bool:
    """Whether fbgemm sums u8 x s8 products into int32 here (AVX-512 VNNI)."""
    return bool(cpu_flags(cpuinfo) & _VNNI_CPU_FLAGS)


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose(call: BatchCall, device: str, torch: Any) -> ipc.Precision:
    """Cast the float32-loaded model to the native reduced dtype if its answers agree; say what was chosen."""
    candidate = native_reduced_dtype(device, torch)
    if candidate is None:
        return ipc.Precision("auto", "float32", note=f"no native bfloat16 on this {device}")
    model = getattr(getattr(call, "pipe", None), "model", None)
    check = call.agreement_inputs(list(CHECK_TEXTS))
    if model is None or check is None:
        return ipc.Precision("auto", "float32", candidate=candidate, note=f"no agreement check for {call.task}")
    inputs, parameters = check
    reference = call(inputs, parameters)
    # On the host: casting back from the reduced dtype would not restore the float32 weights.
    saved = host_copy(model.state_dict())
    agreement: ipc.Agreement | None = None
    try:
        cast(model, getattr(torch, candidate))
        agreement = compare(reference, call(inputs, parameters))
        if agrees(agreement):
            return ipc.Precision("auto", candidate, candidate=candidate, agreement=agreement)
        note = f"{candidate} disagreed with float32: {describe(agreement)}"
    except Exception as exc:  # noqa: BLE001 - any failure of the reduced model means float32
        note = f"{candidate} failed the check ({type(exc).__name__})"
    cast(model, torch.float32)
    model.load_state_dict(saved)
    log.warning("%s; serving in float32", note)
    return ipc.Precision("auto", "float32", candidate=candidate, agreement=agreement, note=note)


def host_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of these weights in host memory, to restore them exactly after a cast."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def cast(model: Any, dtype: Any) -> None:
    """model.to(dtype), except for the floating buffers a checkpoint does not hold (rotary
    position frequencies): computed at load, they keep their float32 values. Cast, they would
    round rotary angles at long positions, and no load_state_dict could bring them back."""
    computed = [(module, name, module._buffers[name]) for module in model.modules()
                for name in module._non_persistent_buffers_set
                if module._buffers.get(name) is not None and module._buffers[name].is_floating_point()]
    model.to(dtype)
    for module, name, original in computed:
        module._buffers[name] = original


def agrees(agreement: ipc.Agreement, mean: float | None = None, floor: float | None = None) -> bool:
    if not agreement.same_answers:
        return False
    if agreement.mean_cosine is None or agreement.min_cosine is None:
        return True
    return (agreement.mean_cosine >= (MEAN_COSINE if mean is None else mean)
            and agreement.min_cosine >= (MIN_COSINE if floor is None else floor))


def quantize_int8(call: BatchCall, device: str, torch: Any, cpuinfo: Path = CPUINFO) -> ipc.Precision:
    """--dtype int8: dynamic int8 Linear layers (a weight scale per output channel, activations
    quantised to 8 bits per call), kept only where the answers hold the int8 floor against float32.

    Eight-bit activations (torch's own default is 7) need AVX-512 VNNI's int32 sums: without them the
    u8 x s8 pair sums saturate int16. Per-tensor weight scales or 7-bit activations fell far
    below the floor on all-MiniLM-L6-v2 (mean 0.93-0.97, bench/QUANTIZATION.md).
    """
    if device != "cpu":
        raise ValueError("--dtype int8 runs on the CPU only; on a GPU use float16 or bfloat16")
    if not has_vnni(cpuinfo):
        raise ValueError("--dtype int8 needs a CPU with AVX-512 VNNI (avx512_vnni); use --dtype auto")
    pipe = getattr(call, "pipe", None)
    check = call.agreement_inputs(list(CHECK_TEXTS))
    if pipe is None or check is None:
        raise ValueError(f"--dtype int8 is not available for {call.task}")
    inputs, parameters = check
    reference = call(inputs, parameters)
    original = pipe.model
    # torch.ao's eager quantisation announces its move to torchao (a separate package) on import
    # and on use; it still ships, and works, in the torch this project pins.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # noqa: PLC0415

        pipe.model = quantize_dynamic(original, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                      dtype=torch.qint8, mapping={torch.nn.Linear: _full_range_linear(torch)})
    agreement = compare(reference, call(inputs, parameters))
    if agrees(agreement, INT8_MEAN_COSINE, INT8_MIN_COSINE):
        return ipc.Precision("int8", "int8", candidate="int8", agreement=agreement)
    pipe.model = original
    note = f"int8 fell below its floor against float32: {describe(agreement)}"
    log.warning("%s; serving in float32", note)
    return ipc.Precision("int8", "float32", candidate="int8", agreement=agreement, note=note)


def _full_range_linear(torch: Any) -> type:
    from torch.ao.nn.quantized.dynamic import Linear  # noqa: PLC0415

    class FullRangeLinear(Linear):  # type: ignore[misc]
        """Dynamic int8 Linear with 8-bit activations (torch's class quantises them to 7)."""

        def forward(self, x: Any) -> Any:
            return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                      reduce_range=False).to(x.dtype)

    return FullRangeLinear


def compare(reference: list[Any], reduced: list[Any]) -> ipc.Agreement:
    """How far the reduced precision's answers are from float32's, input by input."""
    same = len(reference) == len(reduced)
    cosines: list[float] = []
    for ref, red in zip(reference, reduced, strict=False):
        ref_vectors, ref_exact = _split(ref)
        red_vectors, red_exact = _split(red)
        same = same and ref_exact == red_exact and len(ref_vectors) == len(red_vectors)
        for a, b in zip(ref_vectors, red_vectors, strict=False):
            if a.shape != b.shape:
                same = False
                continue
            cosines.append(_cosine(a, b))
    if not cosines:
        return ipc.Agreement(same_answers=same, inputs=len(reference))
    return ipc.Agreement(same_answers=same, inputs=len(reference),
                         mean_cosine=float(np.mean(cosines)), min_cosine=float(min(cosines)))


def describe(agreement: ipc.Agreement) -> str:
    parts = ["same answers" if agreement.same_answers else "different answers"]
    if agreement.min_cosine is not None:
        parts.append(f"mean cosine {agreement.mean_cosine:.6f}, min {agreement.min_cosine:.6f}")
    return f"{', '.join(parts)} on {agreement.inputs} inputs"


def _split(answer: Any) -> tuple[list[np.ndarray], list[Any]]:
    """An answer's float vectors, and its exact parts (strings, integers, booleans, in order)."""
    vectors: list[np.ndarray] = []
    exact: list[Any] = []
    for leaf in _leaves(answer):
        if isinstance(leaf, np.ndarray):
            vectors.append(leaf)
        else:
            exact.append(leaf)
    return vectors, exact


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            yield value.astype(np.float64).ravel()
        else:
            yield from value.ravel().tolist()
    elif isinstance(value, dict):
        for key in sorted(value):
            yield key
            yield from _leaves(value[key])
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(item, float) for item in value):
            yield np.asarray(value, dtype=np.float64)
        else:
            for item in value:
                yield from _leaves(item)
    elif not isinstance(value, float):  # a lone float is a score: its ranking shows in the order
        yield value


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    value = float(np.dot(a, b) / norms)
    return value if math.isfinite(value) else 0.0
