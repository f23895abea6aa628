"""The model process keeps its RSS flat under batches of ever-changing shapes.

Two causes were measured (bench/MEMORY.md): torch's per-shape CPU kernel caches, and the holes
that freed activations leave in glibc's heap. The worker turns ideep's cache off and bounds oneDNN's unless the operator
set them, bounds oneDNN's, and trims the heap after each batch; both are shown here on their own.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")]

# Fill the heap with blocks below the mmap threshold, free all but the last (which pins the heap's
# top, so glibc cannot shrink it on its own), then report RSS before and after the worker's trim.
_PROBE = """
import ctypes, os
from pipeserve import model_proc

def rss_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = []
for _ in range(3000):
    block = libc.malloc(64 << 10)
    ctypes.memset(block, 1, 64 << 10)  # touched: resident
    blocks.append(block)
for block in blocks[:-1]:
    libc.free(block)
before = rss_mib()
model_proc._free_memory_returner()()
print(before, rss_mib())
"""


def test_the_heaps_free_pages_go_back_after_a_batch() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=True)
    before, after = map(int, result.stdout.split())
    assert before - after >= 150  # of ~187 MiB freed but held by the heap


def test_the_per_shape_kernel_caches_are_bounded_unless_the_operator_says_otherwise() -> None:
    from pipeserve import model_proc

    environ = {"LRU_CACHE_CAPACITY": "64"}
    model_proc._bound_shape_caches(environ)
    assert environ == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}
