"""The model process keeps big, short-lived allocations (tensors) out of glibc's heap.

glibc raises its mmap threshold each time an mmapped block is freed, so the next activations
come from the heap, which fragments and never shrinks (the worker's RSS crept for minutes under
steady load). The model process fixes the threshold at start; this shows the difference in a
fresh interpreter, on glibc only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")]

_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no-glibc"); sys.exit()
if sys.argv[1] == "fixed":
    from pipeserve import model_proc
    model_proc._keep_large_allocations_out_of_the_heap()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # a big batch's tensor, freed
before = libc.mallinfo2().hblks
block = libc.malloc(8 << 20)  # the next, smaller one
print("mmapped" if libc.mallinfo2().hblks > before else "heap")
libc.free(block)
"""


def _where_the_next_tensor_goes(mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=30,
                            check=True)
    return result.stdout.strip()


def test_after_a_big_free_the_next_tensor_is_still_mmapped() -> None:
    default = _where_the_next_tensor_goes("default")
    if default == "no-glibc":
        pytest.skip("not glibc")
    assert default == "heap"  # glibc's own policy: the threshold climbed past 8 MiB
    assert _where_the_next_tensor_goes("fixed") == "mmapped"


def test_the_per_shape_kernel_caches_are_off_unless_the_operator_says_otherwise() -> None:
    from pipeserve import model_proc

    environ = {"LRU_CACHE_CAPACITY": "64"}
    model_proc._turn_off_shape_caches(environ)
    assert environ == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
