"""The model process's memory: its resident size, giving the allocator's free pages back, and
--max-worker-memory (model_proc drains the process past it; the front retires it)."""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

from pipeserve import ipc

log = logging.getLogger("pipeserve.worker")


def free_memory_returner(allocator: str = "glibc") -> Callable[[], None]:
    """glibc's malloc_trim: give the heap's free pages back to the kernel after each batch.

    Activations and outputs change size with every batch's shape; freed, they leave holes in
    glibc's heap that RSS keeps (its mmap threshold also climbs as big blocks are freed, so ever
    more of them land there): RSS climbed 477 -> 968 MiB over 154 batches here. Trimming keeps
    it flat, at a price: the next batch faults the pages back in (~6 % of bf16 batch throughput
    against the same caches untrimmed; trimming only once over 64 MiB lay free cost as much, over
    256 MiB ~1 % less but RSS swung by 250 MiB). A fixed mmap threshold cost up to 20 %.
    tcmalloc, which the front preloads where installed, needs none of this (bench/MEMORY.md).
    """
    if allocator != "glibc":
        return lambda: None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave otherwise
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]

    def return_free_memory() -> None:
        trim(0)

    return return_free_memory


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def fits_limit(spec: ipc.WorkerSpec) -> None:
    """A loaded model already past --max-worker-memory would be restarted after every batch or
    stream, and each restart loads it again: refuse to start instead."""
    if not spec.max_worker_memory or not spec.first_start:
        return
    free_memory_returner(spec.allocator)()
    rss = rss_bytes()
    if spec.past_memory_limit(rss):
        raise ValueError(f"the loaded model's process holds {rss >> 20} MiB, over --max-worker-memory "
                         f"{spec.max_worker_memory >> 20} MiB; raise the limit")


# Past the limit untrimmed but not trimmed, a process would trim (and fault the pages back in)
# every step; within this long of a trim, a reading past the limit is believed as it is.
TRIM_INTERVAL_S = 1.0
_last_trim = [float("-inf")]


def over_limit(spec: ipc.WorkerSpec, return_free_memory: Callable[[], None]) -> bool:
    """Past --max-worker-memory while generating, after returning what the allocator holds free
    (glibc keeps freed buffers of finished sequences until trimmed; measured first without it,
    which costs one read of /proc a step)."""
    assert spec.max_worker_memory
    rss = rss_bytes()
    if not spec.past_memory_limit(rss):
        return False
    if time.monotonic() - _last_trim[0] >= TRIM_INTERVAL_S:
        return_free_memory()
        _last_trim[0] = time.monotonic()
        rss = rss_bytes()
    if not spec.past_memory_limit(rss):
        return False
    log.warning("RSS %d MiB exceeds --max-worker-memory %d MiB while generating; draining for a restart",
                rss >> 20, spec.max_worker_memory >> 20)
    return True
