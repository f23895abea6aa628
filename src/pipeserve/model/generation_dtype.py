"""`--dtype auto` for a text generator: the fastest precision whose greedy answers agree with
float32's, timed at warm-up.

Which precision decodes fastest depends on the machine and on how many streams share a step:
on this project's 2-core bench machine, weight-only int8 beat bfloat16 for one stream and lost to
it at 32, int8 with 8-bit activations (AVX-512 VNNI) beat it at 1 to 32 with bfloat16 between its
products and from 1 to 4 streams, level at 16, with float32 between them (model/weight_int8.py),
and bfloat16 is emulated, and slow, on CPUs without avx512_bf16. So nothing is chosen by rule.
The model loads in float32 and answers the check inputs; then each candidate (bfloat16 where
the device runs it natively, int8 weights on a CPU with torch's int8 kernel) is put in place,
answers them too, and, where every greedy token is the same, is timed: DECODE_STEPS decoding
steps of the engine for one stream and as many for --max-running-sequences streams, with the
layers packed as they would be served. The fastest of those, float32 included, is kept; the log
and /info say every time and agreement. float32 stays unless the fastest is CLEAR_GAIN faster.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from pipeserve import ipc
from pipeserve.model import precision, prepack, siblings, weight_int8
from pipeserve.model.adapters import PipelineCall
from pipeserve.model.generation import Engine

log = logging.getLogger("pipeserve.model")

# Few steps, on a short prompt: on a large model a CPU prefill of --max-running-sequences long
# prompts would cost minutes of the load's time (--load-timeout), and a decoding step's cost
# hardly depends on the prompt.
DECODE_STEPS = 4
_TIMING_PROMPT = "The quick brown fox"
# A reduced precision is kept only where it is at least this much faster than float32: its
# answers are still not float32's, and a few percent is within the warm-up timing's noise. On a
# tiny model, where every precision times within ~5 % of the others, the choice otherwise
# changed from one start to the next.
CLEAR_GAIN = 0.10


def choose(call: PipelineCall, device: str, torch: Any, max_running: int) -> ipc.Precision:
    """Leave the model in the fastest agreeing precision (float32 at worst); say which and why."""
    model = call.pipe.model
    check = call.agreement_inputs(list(precision.CHECK_TEXTS))
    if check is None:
        return ipc.Precision("auto", "float32", note=f"no agreement check for {call.task}")
    inputs, parameters = check
    reference = call(inputs, parameters)
    candidates = _candidates(device, torch)
    saved = _snapshot(model, torch, whole="int8" not in candidates or len(candidates) > 1)
    timings = {"float32": _timed(call, device, torch, max_running, "float32")}
    agreements: dict[str, ipc.Agreement] = {}
    notes = []
    for candidate in candidates:
        swapped: prepack.Swapped = []
        try:
            swapped = _put(call, candidate, torch)
            agreements[candidate] = precision.compare(reference, call(inputs, parameters))
            if agreements[candidate].same_answers:
                timings[candidate] = _timed(call, device, torch, max_running, candidate)
            else:
                notes.append(f"{candidate} disagreed ({precision.describe(agreements[candidate])})")
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate leaves it out
            notes.append(f"{candidate} failed the check ({type(exc).__name__})")
        finally:  # back to the float32 model, exactly
            prepack.restore(swapped)
            precision.cast(model, torch.float32)
            model.load_state_dict(saved, strict=False)
    chosen = min(timings, key=lambda dtype: timings[dtype])
    if timings[chosen] > (1 - CLEAR_GAIN) * timings["float32"]:
        chosen = "float32"
    if chosen != "float32":
        _put(call, chosen, torch)
    times = ", ".join(f"{dtype} {seconds * 1000:.1f} ms" for dtype, seconds in timings.items())
    note = (f"fastest agreeing precision (float32 unless another is {CLEAR_GAIN * 100:.0f} % faster); "
            f"1 + {max_running} streams' decoding step: {times}")
    note += "".join(f"; {part}" for part in notes)
    log.info("--dtype auto for generation: %s (%s)", chosen, note)
    return ipc.Precision("auto", chosen, candidate=chosen if chosen != "float32" else None,
                         agreement=agreements.get(chosen), note=note)


def _candidates(device: str, torch: Any) -> list[str]:
    found = []
    native = precision.native_reduced_dtype(device, torch)
    if native is not None:
        found.append(native)
    if device == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        found.append("int8")
    return found


def _snapshot(model: Any, torch: Any, whole: bool) -> dict[str, Any]:
    """A host copy of the float32 weights a candidate changes: all of them where a candidate
    casts the whole model; for int8 alone, all but the Linear layers' (quantize leaves those
    untouched), so that a large model is not held twice, and none where int8 keeps the rest
    float32 (8-bit activations)."""
    if not whole and weight_int8.quantizes_activations(torch):
        return {}
    state = model.state_dict()
    if not whole:
        linear = {f"{name}.{key}" for name, module in model.named_modules()
                  if prepack.linear_weight(module, torch) is not None for key in ("weight", "bias")}
        state = {name: tensor for name, tensor in state.items() if name not in linear}
    return precision.host_copy(state)


def _put(call: PipelineCall, dtype: str, torch: Any) -> prepack.Swapped:
    """Put the float32 model in `dtype`; the layers int8 replaced, to put back."""
    if dtype == "int8":
        return weight_int8.quantize(call.pipe.model, torch)
    precision.cast(call.pipe.model, getattr(torch, dtype))
    return []


def _timed(call: PipelineCall, device: str, torch: Any, max_running: int, dtype: str) -> float:
    """One stream's median decoding step plus --max-running-sequences streams', with the Linear
    layers packed where serving would pack them."""
    packed = siblings.swap(call.pipe.model, torch) if prepack.pays(device, dtype, torch) else []
    try:
        total = 0.0
        # One engine for both widths: its load-time check (lean_decode.verified) runs once.
        engine = Engine(call.pipe.model, call.pipe.tokenizer, max_running)
        for rows in (1, max_running):
            for stream in range(rows):
                engine.add(ipc.Generate(stream, _TIMING_PROMPT, {"max_new_tokens": DECODE_STEPS + 2,
                                                                  "ignore_eos": True}))
            while engine.waiting:  # the prefill (several steps past the engine's prefill_tokens)
                engine.step()
            steps = []
            for _ in range(DECODE_STEPS):
                started = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - started)
            total += statistics.median(steps)
            while engine.active:  # the streams' last tokens: the next width starts on an empty engine
                engine.step()
        return total
    finally:
        prepack.restore(packed)
