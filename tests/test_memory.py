"""The model process keeps its RSS flat under batches of ever-changing shapes.

Two causes were measured (bench/MEMORY.md): torch's per-shape CPU kernel caches, and the holes
that freed activations leave in glibc's heap. The worker turns ideep's cache off and bounds
oneDNN's unless the operator set them; the front preloads tcmalloc into the model processes
where it is installed (`.ci/run` installs it, so CI runs this path), and a worker on glibc trims
its heap after each batch instead. Each is shown here on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import post_json
from pipeserve.front import allocator

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")]

# Fill the heap with blocks below the mmap threshold, free all but the last (which pins the heap's
# top, so glibc cannot shrink it on its own), then report RSS before and after the worker's trim.
_PROBE = """
import ctypes, os
from pipeserve.model import memory

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
memory.free_memory_returner()()
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


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_model_process_runs_on_tcmalloc_and_the_front_keeps_glibc(start_server: Any) -> None:
    if allocator.find_tcmalloc() is None:
        # CI installs it (.ci/run): there a missing tcmalloc is a failure, not a skip.
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("tcmalloc is not installed, and CI must run this test (apt-get install libtcmalloc-minimal4)")
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    server = start_server("--pipeline", "custom_pipelines:make")
    assert post_json(server.port, {"inputs": "hello"}).status == 200
    assert "libtcmalloc" in _maps(server.worker_pid())
    assert "libtcmalloc" not in _maps(server.process.pid)
    assert server.info()["allocator"].startswith("tcmalloc (")
    assert "allocator tcmalloc" in server.log


def test_allocator_glibc_keeps_the_c_librarys_malloc(start_server: Any) -> None:
    server = start_server("--pipeline", "custom_pipelines:make", "--allocator", "glibc")
    assert post_json(server.port, {"inputs": "hello"}).status == 200
    assert "libtcmalloc" not in _maps(server.worker_pid())
    assert server.info()["allocator"] == "glibc" and "allocator glibc" in server.log


def test_prepare_leaves_an_operators_preload_alone_and_says_when_tcmalloc_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert allocator.prepare("auto", environ).startswith("preloaded by LD_PRELOAD")
    assert environ == {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    environ = {}
    assert allocator.prepare("glibc", environ) == "glibc" and environ == {}
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.prepare("auto", environ) == "glibc" and environ == {}
    with pytest.raises(allocator.AllocatorNotFound, match="libtcmalloc-minimal4"):
        allocator.prepare("tcmalloc", environ)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    environ = {"LD_PRELOAD": "libother.so"}
    assert allocator.prepare("tcmalloc", environ) == "tcmalloc (libtcmalloc_minimal.so.4)"
    assert environ["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so"


def test_a_library_search_that_cannot_write_a_temporary_file_finds_no_tcmalloc(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where ldconfig has no entry, ctypes links a probe with gcc into a temporary file; with the
    temporary directory unusable (a read-only root without a /tmp volume) that raises: not found,
    and `auto` falls back to glibc instead of the front dying with a traceback."""
    import ctypes.util
    import tempfile

    def unusable_tmp(name: str) -> str | None:
        with tempfile.NamedTemporaryFile(dir=tmp_path / "missing"):  # the OSError gcc's probe meets
            return None

    monkeypatch.setattr(ctypes.util, "find_library", unusable_tmp)
    assert allocator.find_tcmalloc() is None
    assert allocator.prepare("auto", {}) == "glibc"


def test_allocator_tcmalloc_where_it_is_missing_exits_2_with_one_line() -> None:
    # The command line itself, in its own process, on a machine where tcmalloc cannot be found.
    script = ("from pipeserve.front import allocator, cli; allocator.find_tcmalloc = lambda: None; "
              "raise SystemExit(cli.main(['--allocator', 'tcmalloc', '--pipeline', 'custom_pipelines:make']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "--allocator tcmalloc: gperftools' tcmalloc is not installed (Debian/Ubuntu: apt install libtcmalloc-minimal4)")
