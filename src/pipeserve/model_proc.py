"""The model process: the only place that imports torch and transformers.

It loads the pipeline once, runs one warm-up inference that fits the task, sends `Ready`, then
executes the batches the front has formed, one at a time: one pipeline call per batch, one
outcome per input. A batch that raises is bisected so only the inputs that fail on their own get
an error; an out-of-memory batch is halved and the largest size that ran is reported back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import MutableMapping, Sequence
from typing import Any

from pipeserve import ipc, logs
from pipeserve.ipc import ErrorKind, ExitCode
from pipeserve.model import loading, media, memory, precision
from pipeserve.model.adapters import BatchCall
from pipeserve.model.generation import Engine

log = logging.getLogger("pipeserve.worker")

_PR_SET_PDEATHSIG = 1
# Per-shape kernel caches of torch's CPU backends, 1024 entries each by default. Every batch has a
# new shape (its size x its longest input), so they fill with entries that rarely come back: the
# worker's RSS grew ~2 MiB per batch of the bench mix here and was still growing past 1 GiB.
# Bounded, RSS levels off once they are full. oneDNN's primitive cache is what makes a lone input
# fast (bf16 p50 21.4 ms with it off, 11.6 ms at 256 entries, in-process), so it stays, bounded;
# ideep's LRU cache at 1 or 256 entries made no difference. The price, against torch's unbounded
# defaults: about 2 % of bf16 batch throughput (the 10-13 % first blamed on them was mostly glibc's
# heap trimming, measured apart since: bench/MEMORY.md). An operator's own values win (README:
# "Memory that stays flat").
SHAPE_CACHE_SETTINGS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "1"}


def main(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Entry point of the spawned process; `conn` is a multiprocess Connection."""
    _configure_logging(spec)
    # Ctrl-C in a terminal (SIGINT), and a service manager stopping a whole control group
    # (SIGTERM), signal every process: the front drains and then tells us to exit (or the pipe
    # closes, or PR_SET_PDEATHSIG fires); dying here at once would lose the batch in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if spec.visible_devices is not None:  # before torch is imported: it reads this once
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.visible_devices
    _die_with_parent(spec.parent_pid)
    if spec.allocator.startswith("tcmalloc") and not hasattr(ctypes.CDLL(None), "tc_malloc"):
        log.warning("the front preloaded %s, but it is not this process's malloc", spec.allocator)
    _bound_shape_caches(os.environ)  # before torch creates its first kernel
    _volunteer_for_oom_killer()
    _yield_cpu_to_the_front()
    try:
        call, engine, ready = _load(spec)
    except BaseException as exc:  # noqa: BLE001 - anything here means "cannot serve"
        reason = f"cannot load model {spec.model or spec.pipeline!r}: {_describe(exc)}"
        _send(conn, ipc.Fatal(reason=reason, detail=traceback.format_exc()))
        os._exit(ExitCode.LOAD_FAILED)
    _send(conn, ready)
    os._exit(_serve(conn, call, engine, spec))


# --- process hygiene --------------------------------------------------------------------------


def _configure_logging(spec: ipc.WorkerSpec) -> None:
    logs.configure(spec.log_level, spec.log_format, prefix=f"{spec.worker_name} pid={os.getpid()} ")
    # transformers' progress bars and advisory warnings are noise on a server's stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us if the front dies, so no orphan keeps holding (GPU) memory."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: pipe EOF still ends the serve loop
        return
    # The front died before prctl took effect: we were re-parented (to init, or a subreaper).
    # Compared with the front's own pid, not with 1: in a container the front is PID 1.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(ExitCode.PIPE_CLOSED)


def _bound_shape_caches(environ: MutableMapping[str, str]) -> None:
    for name, value in SHAPE_CACHE_SETTINGS.items():
        environ.setdefault(name, value)


def _volunteer_for_oom_killer() -> None:
    """Raise our oom_score_adj so the kernel's OOM killer picks the model process, not the front."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")
    except OSError:
        log.debug("could not raise oom_score_adj")


WORKER_NICENESS = 5


def _yield_cpu_to_the_front() -> None:
    """Run at a lower CPU priority than the front: when compute saturates the cores, the front
    still parses, refuses (503) and answers at once instead of queueing behind the model."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        log.debug("could not lower the worker's CPU priority")


def _send(conn: Any, message: ipc.FromWorker) -> None:
    conn.send_bytes(ipc.encode(message))


# --- loading ----------------------------------------------------------------------------------


def _load(spec: ipc.WorkerSpec) -> tuple[BatchCall, Engine | None, ipc.Ready]:
    started = time.monotonic()
    import torch  # noqa: PLC0415 - only the model process may import torch

    torch.set_num_threads(spec.threads)
    device = _resolve_device(spec.device, torch)
    call, chosen = loading.load(spec, device, torch)
    warmup = call.warmup()
    if warmup is not None:
        call(*warmup)
    # The engine before Ready: its load-time check (model/lean_decode.py's) is part of loading,
    # and /info reports what it chose.
    engine = call.engine(spec.max_running_sequences, spec.prefix_cache_bytes, spec.max_batch_prefill_tokens)
    # str(): torch.__version__ is a TorchVersion, and unpickling one would import torch in the front.
    versions = {"torch": str(torch.__version__), "python": sys.version.split()[0]}
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        versions["transformers"] = str(transformers.__version__)
    parameters, open_parameters = call.schema()
    ready = ipc.Ready(
        protocol_version=ipc.PROTOCOL_VERSION,
        pid=os.getpid(),
        model=spec.model,
        task=call.task,
        device=device,
        dtype=chosen.dtype,
        load_seconds=time.monotonic() - started,
        versions=versions,
        parameters=parameters,
        open_parameters=open_parameters,
        input_kind=call.input_kind,
        details={**call.details(), **(engine.details() if engine is not None else {})},
        precision=chosen,
    )
    log.info("loaded %s (%s) on %s in %s in %.1fs%s; allocator %s", spec.model or spec.pipeline, call.task,
             device, chosen.dtype, ready.load_seconds, _precision_note(chosen), spec.allocator)
    memory.fits_limit(spec)
    return call, engine, ready


def _precision_note(chosen: ipc.Precision) -> str:
    if chosen.agreement is not None and chosen.dtype == chosen.candidate:
        return f" (--dtype {chosen.requested}: {precision.describe(chosen.agreement)} vs float32)"
    return f" ({chosen.note})" if chosen.note else ""


def _resolve_device(device: str, torch: Any) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    return device


# --- serving ----------------------------------------------------------------------------------


def _serve(conn: Any, call: BatchCall, engine: Engine | None, spec: ipc.WorkerSpec) -> int:
    """Answer messages; while sequences are being generated, one decoding step between reads.

    Past --max-worker-memory (measured after each batch and each decoding step) the process
    drains: its steps say so, the front sends it no new work, and once it holds none the front
    sends `Retire`; it exits for a clean restart when nothing is left to generate. The front
    decides when: a stream or batch it sent before it knew is served, not lost to the exit."""
    return_free_memory = memory.free_memory_returner(spec.allocator)
    draining = retiring = False
    while True:
        generating = engine is not None and engine.active
        if retiring and not generating:
            log.warning("retired by the front past --max-worker-memory; exiting for a clean restart")
            return ExitCode.MEMORY_LIMIT
        try:
            # Block for the next message only when no sequence waits for its next step.
            if generating and not conn.poll(0):
                assert engine is not None
                step = _step(engine)
                if spec.max_worker_memory and not draining:
                    draining = memory.over_limit(spec, return_free_memory)
                _send(conn, dataclasses.replace(step, draining=True) if draining else step)
                continue
            message = ipc.decode(conn.recv_bytes())
        except (EOFError, OSError):
            log.info("pipe closed by the front; exiting")
            return ExitCode.PIPE_CLOSED
        if isinstance(message, ipc.Shutdown):
            log.info("shutdown requested")
            return ExitCode.OK
        if isinstance(message, ipc.Retire):
            retiring = True
            continue
        if isinstance(message, (ipc.Generate, ipc.Cancel)):
            ended = _stream_message(engine, message)
            if ended is not None:
                _send(conn, ipc.Step([], [ended], draining=draining))
            continue
        if not isinstance(message, ipc.Batch):
            log.error("unexpected message %s", type(message).__name__)
            continue
        result = run_batch(call, message)
        try:
            _send(conn, result)
        except (BrokenPipeError, OSError):
            return ExitCode.PIPE_CLOSED
        return_free_memory()  # after the answer is on its way: off the request's latency
        # The front reads the same figure (result.rss_bytes, measured as the batch ended) the same way.
        if spec.past_memory_limit(result.rss_bytes) and not draining:
            draining = True
            log.warning("RSS %d MiB exceeds --max-worker-memory %d MiB after a batch; draining for a restart",
                        result.rss_bytes >> 20, (spec.max_worker_memory or 0) >> 20)


def _stream_message(engine: Engine | None, message: ipc.Generate | ipc.Cancel) -> ipc.StreamEnd | None:
    if isinstance(message, ipc.Cancel):
        if engine is not None:
            engine.cancel(message.stream_id)
        return None
    if engine is None:
        return ipc.StreamEnd(message.stream_id, "error", 0, 0,
                             error=ipc.Failed(ErrorKind.BAD_INPUT, "this model does not generate text"))
    try:
        return engine.add(message)
    except Exception as exc:  # noqa: BLE001 - one request's failure, not the worker's
        log.error("queueing a sequence failed\n%s", _traceback(exc))
        return ipc.StreamEnd(message.stream_id, "error", 0, 0,
                             error=ipc.Failed(ErrorKind.INTERNAL, "generation failed"))


def _step(engine: Engine) -> ipc.Step:
    """One decoding step; a step that raises ends every sequence with an error, not the worker."""
    out_of_memory = False
    try:
        return engine.step()
    except Exception as exc:  # noqa: BLE001 - classified like a batch's failure
        _exit_if_the_device_broke(exc)
        out_of_memory = _is_out_of_memory(exc)
        log.error("generation step failed\n%s", _traceback(exc))
    kind = ErrorKind.OUT_OF_MEMORY if out_of_memory else ErrorKind.INTERNAL
    ended = engine.fail_all(ipc.Failed(kind, "generation failed"))
    if out_of_memory:  # once the step's frames and the sequences' caches are let go (see run_batch)
        _release_memory()
    return ipc.Step([], ended)


def run_batch(call: BatchCall, batch: ipc.Batch) -> ipc.BatchResult:
    """Run a batch; bisect on errors, halve on out-of-memory; one outcome per input."""
    started = time.monotonic()
    outcomes: list[ipc.Outcome | None] = [None] * len(batch.inputs)
    calls = 0
    oom_seen = False
    largest_fit = 0

    operation = _OPERATIONS[batch.op]

    def attempt(indices: Sequence[int]) -> None:
        nonlocal calls, oom_seen, largest_fit
        calls += 1
        failed = out_of_memory = False
        try:
            results = operation(call, [batch.inputs[i] for i in indices], batch.parameters)
            counts = call.token_counts() if batch.op is ipc.Op.PIPELINE else None
        except BaseException as exc:  # classified below; only a broken device ends the worker
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            _exit_if_the_device_broke(exc)
            failed, out_of_memory = True, _is_out_of_memory(exc)
            if len(indices) == 1:
                outcomes[indices[0]] = _failure(exc, out_of_memory, batch, indices[0])
        # Retried only out here: inside the handler, the exception's traceback keeps the failed
        # call's frames and everything they allocated (a GPU's activations), so empty_cache()
        # could free none of it and each level of halving would run on top of the last.
        if failed:
            if out_of_memory:
                oom_seen = True
                _release_memory()
            if len(indices) > 1:
                middle = len(indices) // 2
                attempt(indices[:middle])
                attempt(indices[middle:])
            return
        largest_fit = max(largest_fit, len(indices))
        for position, (index, value) in enumerate(zip(indices, results, strict=True)):
            outcomes[index] = ipc.Ok(value, counts[position] if counts else None)

    attempt(range(len(batch.inputs)))
    return ipc.BatchResult(
        batch_id=batch.batch_id,
        outcomes=[o if o is not None else ipc.Failed(ErrorKind.INTERNAL, "no result") for o in outcomes],
        compute_seconds=time.monotonic() - started,
        pipeline_calls=calls,
        fits_batch_size=(largest_fit or 1) if oom_seen else None,
        rss_bytes=memory.rss_bytes(),
    )


def _run_pipeline(call: BatchCall, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
    return call(inputs, parameters)


def _tokenize(call: BatchCall, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
    return call.tokenize(inputs, parameters)


def _decode(call: BatchCall, inputs: list[Any], parameters: dict[str, Any]) -> list[Any]:
    return call.decode(inputs, parameters)


_OPERATIONS = {ipc.Op.PIPELINE: _run_pipeline, ipc.Op.TOKENIZE: _tokenize, ipc.Op.DECODE: _decode}
_BAD_INPUT_TYPES = (ValueError, TypeError, KeyError, UnicodeError)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # torch.cuda.OutOfMemoryError, without importing torch.cuda where it is unused. An allocation
    # outside torch's caching allocator (cuBLAS's or cuDNN's workspace, pinned memory) fails as a
    # RuntimeError or AcceleratorError "CUDA error: out of memory", or cuBLAS's ALLOC_FAILED: not
    # a broken device either, and halving helps.
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    # (torch.AcceleratorError is a RuntimeError.)
    return isinstance(exc, RuntimeError) and ("CUDA error: out of memory" in str(exc)
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in str(exc))


def _exit_if_the_device_broke(exc: BaseException) -> None:
    """A CUDA error other than out-of-memory (a device-side assert, an illegal address) leaves the
    process's CUDA context broken: every later call fails the same way, while /ready still says
    200. Only a new process recovers, so this one exits and the front restarts it (what it was
    running is answered as a crash: 503, or an error event)."""
    if _is_out_of_memory(exc):
        return
    cuda_error = isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error:")
    if type(exc).__name__ == "AcceleratorError" or cuda_error:
        log.error("device error; exiting for a restart\n%s", _traceback(exc))
        os._exit(ExitCode.DEVICE_ERROR)


def _release_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _failure(exc: BaseException, out_of_memory: bool, batch: ipc.Batch, index: int) -> ipc.Failed:
    request_id = batch.request_ids[index] if index < len(batch.request_ids) else "-"
    if out_of_memory:
        log.warning("request %s: input does not fit in memory even alone: %s", request_id, _describe(exc))
        return ipc.Failed(ErrorKind.OUT_OF_MEMORY, "input too large for the model's memory")
    if isinstance(exc, media.InputTooLarge):
        log.info("request %s: input over a size limit: %s", request_id, exc)
        return ipc.Failed(ErrorKind.TOO_LARGE, ipc.public_message(str(exc)))
    if isinstance(exc, _BAD_INPUT_TYPES) or type(exc).__name__ == "PipelineException":
        log.info("request %s: input rejected by the pipeline: %s", request_id, _describe(exc))
        message = ipc.public_message(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
        return ipc.Failed(ErrorKind.BAD_INPUT, message or "the pipeline rejected this input")
    log.error("request %s: pipeline failed\n%s", request_id, _traceback(exc))
    return ipc.Failed(ErrorKind.INTERNAL, "inference failed")


def _traceback(exc: BaseException) -> str:
    """The exception's traceback as one log message's text (the log line stays one record)."""
    return "".join(traceback.format_exception(exc)).rstrip()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {ipc.public_message(str(exc)) or 'no detail'}"
