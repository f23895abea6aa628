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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeserve import ipc
from pipeserve.model.adapters import BatchCall

log = logging.getLogger("pipeserve.model")

MEAN_COSINE = 0.9999
MIN_COSINE = 0.999
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


def native_reduced_dtype(device: str, torch: Any, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The reduced dtype this device computes natively, or None where only float32 is native."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "cpu" and cpu_flags(cpuinfo) & _NATIVE_BF16_CPU_FLAGS:
        return "bfloat16"
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
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
    saved = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    agreement: ipc.Agreement | None = None
    try:
        model.to(getattr(torch, candidate))
        agreement = compare(reference, call(inputs, parameters))
        if agrees(agreement):
            return ipc.Precision("auto", candidate, candidate=candidate, agreement=agreement)
        note = f"{candidate} disagreed with float32: {describe(agreement)}"
    except Exception as exc:  # noqa: BLE001 - any failure of the reduced model means float32
        note = f"{candidate} failed the check ({type(exc).__name__})"
    model.to(torch.float32)
    model.load_state_dict(saved)
    log.warning("%s; serving in float32", note)
    return ipc.Precision("auto", "float32", candidate=candidate, agreement=agreement, note=note)


def agrees(agreement: ipc.Agreement) -> bool:
    if not agreement.same_answers:
        return False
    if agreement.mean_cosine is None or agreement.min_cosine is None:
        return True
    return agreement.mean_cosine >= MEAN_COSINE and agreement.min_cosine >= MIN_COSINE


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
