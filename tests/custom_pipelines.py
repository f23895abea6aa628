"""Custom pipelines for the tests, loaded by a real server with --pipeline custom_pipelines:...

`make` returns one configurable pipeline. Each output is {"text", "batch_size", "call", "pid"},
so a test can see how inputs were batched. Inputs that are commands make it misbehave in the
way a real model process can:

    "WAIT:<path>" the call blocks until the file <path> exists: a test holds a batch in flight
                  for as long as it needs, and releases it by creating the file
    "SLEEP:<s>"   the whole call sleeps <s> seconds (prefer WAIT: a sleep is no synchronisation)
    "HANG"        the call never returns
    "POISON..."   the call raises ValueError whenever this input is in the batch
    "RAISE"       the call raises RuntimeError carrying a file path (must not leak)
    "CUDA_ASSERT" the call raises what torch raises after a device-side assert (a broken context)
    "SEGV"        the process kills itself with SIGSEGV
    "EXIT"        the process calls os._exit(7)
    "ALLOC:<mb>"  the process allocates and keeps <mb> MiB
    "OOM"         the call raises MemoryError whenever this input is in the batch
    "ORPHAN:<path>" the process leaves an orphan behind: a grandchild (its pid written to
                  <path>) that exits once its own parent has, re-parented to the namespace's
                  init (or a subreaper), which must reap it

Environment:

    TEST_LOAD_GATE=path        loading waits until that file exists
    TEST_LOAD_GATE_ARMED=path2 with TEST_LOAD_GATE: only a load that starts while path2 exists
                               waits, so the first load goes through and a test arms the gate
                               to hold a restarted worker in its load
    TEST_LOAD_DELAY_S=s        loading takes that long (prefer the gate)
    TEST_FAIL_LOAD_IF_EXISTS   loading fails while the file it names exists
    TEST_CALL_DELAY_S=s        every call takes that long (a model with a fixed cost per batch)
    TEST_OOM_ABOVE=N           any call of more than N inputs raises MemoryError; each output then
                               says how many failed calls' frames (their "activations") are still
                               alive in `held`
    TEST_PLAIN=1               turns the commands off (for fuzzing)
    TEST_SEEN_FILE=path        every input the pipeline sees is appended to that file
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import weakref
from typing import Any

_kept: list[bytearray] = []
GATE_POLL_S = 0.01


def wait_for_file(path: str) -> None:
    """Block until the file at `path` exists (a test creates it to release us)."""
    while not os.path.exists(path):
        time.sleep(GATE_POLL_S)


class _Activations:
    """Stands for what a failed forward pass allocated: alive as long as that call's frame is."""


_failed_activations: list[weakref.ref[_Activations]] = []


class EchoPipeline:
    warmup_inputs = ["warm-up"]

    def __init__(self) -> None:
        self.calls = 0
        self.oom_above = int(os.environ.get("TEST_OOM_ABOVE", "0"))
        self.seen_file = os.environ.get("TEST_SEEN_FILE")
        self.call_delay = float(os.environ.get("TEST_CALL_DELAY_S", "0"))
        self.plain = os.environ.get("TEST_PLAIN") == "1"

    def __call__(self, inputs: list[str], suffix: str = "", upper: bool = False) -> list[dict[str, Any]]:
        self.calls += 1
        if self.seen_file:
            with open(self.seen_file, "a") as handle:
                handle.writelines(f"{text}\n" for text in inputs)
        time.sleep(self.call_delay)
        held = sum(ref() is not None for ref in _failed_activations)
        if self.oom_above and len(inputs) > self.oom_above:
            activations = _Activations()  # in this frame, which the MemoryError's traceback keeps
            _failed_activations.append(weakref.ref(activations))
            raise MemoryError(f"batch of {len(inputs)} does not fit")
        for text in inputs:
            if not self.plain:
                self._act(text)
        return [
            {"text": (text.upper() if upper else text) + suffix, "batch_size": len(inputs),
             "call": self.calls, "pid": os.getpid(), **({"held": held} if self.oom_above else {})}
            for text in inputs
        ]

    @staticmethod
    def _act(text: str) -> None:
        if text.startswith("WAIT:"):
            wait_for_file(text.split(":", 1)[1])
        elif text.startswith("SLEEP:"):
            time.sleep(float(text.split(":", 1)[1]))
        elif text == "HANG":
            while True:
                time.sleep(3600)
        elif text.startswith("POISON"):
            raise ValueError(f"poison input {text!r}")
        elif text == "OOM":
            raise MemoryError("cannot allocate")
        elif text == "CUDA_ASSERT":
            raise RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` ...")
        elif text == "RAISE":
            raise RuntimeError("failed reading /home/secret/models/weights.bin at offset 42")
        elif text == "SEGV":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif text == "EXIT":
            os._exit(7)
        elif text.startswith("ORPHAN:"):
            _leave_an_orphan(text.split(":", 1)[1])
        elif text.startswith("ALLOC:"):
            chunk = bytearray(int(text.split(":", 1)[1]) * 1024 * 1024)
            chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page so it counts in RSS
            _kept.append(chunk)


def _leave_an_orphan(pid_file: str) -> None:
    # Through a shell, not os.fork: a forked copy of this multi-threaded process (torch's
    # threads, tcmalloc's locks) may deadlock at its first allocation. The shell's background
    # subshell outlives the shell, so it is re-parented, and exits a moment later.
    subprocess.run(["/bin/sh", "-c", f'(sleep 0.3; exit 0) & echo $! > "{pid_file}"'], check=True)


def make() -> EchoPipeline:
    time.sleep(float(os.environ.get("TEST_LOAD_DELAY_S", "0")))
    gate = os.environ.get("TEST_LOAD_GATE")
    armed = os.environ.get("TEST_LOAD_GATE_ARMED")
    if gate and (not armed or os.path.exists(armed)):
        wait_for_file(gate)
    marker = os.environ.get("TEST_FAIL_LOAD_IF_EXISTS")
    if marker and os.path.exists(marker):
        raise OSError("the model files went away")
    return EchoPipeline()


def fail_to_load() -> EchoPipeline:
    raise RuntimeError("weights at /srv/models/broken are corrupt")


def hang_on_load() -> EchoPipeline:
    while True:
        time.sleep(3600)
