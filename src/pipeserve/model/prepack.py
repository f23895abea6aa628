"""Linear layers whose weights are packed for oneDNN once, at load, on an x86 CPU.

torch's linear on a CPU lays the weight matrix out in oneDNN's blocked format again on every
call. For the few hundred rows of a batch of short texts, or the few rows of a decoding step,
that costs about as much as the product itself. all-MiniLM-L6-v2, one thread: a 10-token
input's forward pass took 6.9 ms in bfloat16, 4.7 ms with the weights packed once (float32:
11.3 -> 6.5 ms); through the server at 64 clients, +7 % req/s for embeddings and +4 % for text
classification. A GPT-2-small-sized generator, bfloat16, two threads: one decoding step for one
stream 35.0 -> 18.8 ms, for 32 streams 86.3 -> 66.0 ms. The packed layer runs the same oneDNN
product on the same weights, and `apply` keeps it only where the model's answers come out the
same as before on the warm-up check inputs.

Runs in the model process, for the tasks that read text (tasks.Task.packs_weights). GPT-2's
Conv1D layers (a Linear with its weight stored transposed) are packed too. A weight that two
layers share (an output layer tied to the input embeddings) is packed as a copy: the embedding
lookup keeps the original, so that weight is held twice; the log line says how much that adds.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from typing import Any, TypeGuard

from pipeserve.model import precision
from pipeserve.model.adapters import BatchCall, PipelineCall

log = logging.getLogger("pipeserve.model")

# Answers with the packed layers must match the unpacked ones this closely (cosine of every
# vector), or the model keeps its plain layers.
SAME_COSINE = 1 - 1e-6

Swapped = list[tuple[Any, str, Any]]  # (parent module, attribute name, the layer replaced) each


def pays(device: str, dtype: str, torch: Any) -> bool:
    """Where packing was measured to pay: float32, or bfloat16 the CPU runs natively, on x86."""
    if device != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == "float32" or (dtype == "bfloat16" and precision.native_reduced_dtype(device, torch) == dtype)


def suits(call: BatchCall) -> TypeGuard[PipelineCall]:
    """A transformers pipeline for a task whose layers may be packed (tasks.Task.packs_weights)."""
    return isinstance(call, PipelineCall) and call.entry.packs_weights


def apply(call: PipelineCall, torch: Any, swapper: Callable[[Any, Any], Swapped] | None = None) -> int:
    """Pack the model's Linear layers if its answers stay the same; return how many were packed.
    `swapper(model, torch)` packs them (`swap` by default; a generator's stacks its projections).

    "The same" is precision.compare's reading of the check answers: every label, token and
    ranking identical, and every vector (an embedding) at cosine >= SAME_COSINE to the plain
    layers'. A lone score is not compared: its ranking is."""
    model = call.pipe.model
    check = call.agreement_inputs(list(precision.CHECK_TEXTS))
    if check is None:
        return 0
    inputs, parameters = check
    before = call(inputs, parameters)
    shared = _shared_storage(model)
    swapped = (swapper or swap)(model, torch)
    try:
        agreement = precision.compare(before, call(inputs, parameters))
    except Exception as exc:  # noqa: BLE001 - any failure of the packed layers means the plain ones
        restore(swapped)
        log.warning("packed linear layers failed (%s); keeping the plain ones", type(exc).__name__)
        return 0
    if not precision.agrees(agreement, mean=SAME_COSINE, floor=SAME_COSINE):
        restore(swapped)
        log.warning("packed linear layers changed the answers (%s); keeping the plain ones",
                    precision.describe(agreement))
        return 0
    copied = sum(original.weight.nbytes for _, _, original in swapped if original.weight.data_ptr() in shared)
    if copied:
        log.info("packed a copy of %.0f MiB of weights that other layers share", copied / 2**20)
    return len(swapped)


def swap(model: Any, torch: Any, make: Callable[[Any, Any], Any] | None = None) -> Swapped:
    """Replace every Linear layer (and GPT-2's Conv1D) with `make(weight [out, in], bias)`, packed
    ones by default: (parent, name, replaced layer) for each, for `restore`. The replaced layers
    are left as they were; a failure midway puts back what was replaced."""
    make = make or packed_linear_class(torch)
    swapped: Swapped = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                weight = linear_weight(child, torch)
                if weight is not None:
                    setattr(parent, name, make(weight, child.bias))
                    swapped.append((parent, name, child))
    except BaseException:
        restore(swapped)
        raise
    return swapped


def linear_weight(module: Any, torch: Any) -> Any | None:
    """The [out, in] weight of exactly a Linear layer or GPT-2's Conv1D, else None (quantised or
    LoRA layers keep their own)."""
    if type(module) is torch.nn.Linear:
        return module.weight
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return module.weight.t()  # GPT-2's: x W + b, W stored [in, out]
    return None


def _shared_storage(model: Any) -> set[int]:
    """Where two parameters share their values (tied input and output embeddings, for one)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            pointer = parameter.data_ptr()
            (shared if pointer in seen else seen).add(pointer)
    return shared


def restore(swapped: Swapped) -> None:
    for parent, name, original in swapped:
        setattr(parent, name, original)


def packed_linear_class(torch: Any) -> type:
    class PackedLinear(torch.nn.Module):  # type: ignore[misc]
        """y = x W^T + b, with W packed for oneDNN once (torch.ops.mkldnn, as inductor's freezing does)."""

        def __init__(self, weight: Any, bias: Any) -> None:  # weight: [out_features, in_features]
            super().__init__()
            self.out_features, self.in_features = weight.shape
            self.register_buffer("packed_weight",
                                 torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None))
            self.register_buffer("bias", None if bias is None else bias.detach())

        def forward(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features)
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
            return y.reshape(*x.shape[:-1], self.out_features)

    return PackedLinear
