"""The model processes' memory allocator, chosen by the front before it spawns them.

glibc's malloc keeps the holes that a model's activations leave when every batch has a new
shape: a worker's RSS climbed for as long as it served. Trimming the heap after each batch keeps
it flat but costs throughput (bf16 7.4 %, fp32 4.5 % in bench/MEMORY.md: the next batch faults
the pages back in).
gperftools' tcmalloc, preloaded, keeps RSS flat at glibc's full speed (bench/MEMORY.md), so the
front preloads it into the model processes where it is installed (Debian/Ubuntu:
libtcmalloc-minimal4) and leaves glibc plus trimming as the fallback. The front itself keeps
glibc: it is already running, and its own memory is small and steady.
"""

from __future__ import annotations

import ctypes.util
from collections.abc import MutableMapping

CHOICES = ("auto", "tcmalloc", "glibc")
_TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' small build first
# tcmalloc reports every allocation over 1 GiB on stderr; loading a large model is no news.
_QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


class AllocatorNotFound(Exception):
    pass


def find_tcmalloc() -> str | None:
    """tcmalloc's shared library as the dynamic loader names it, or None where not installed."""
    for name in _TCMALLOC_LIBRARIES:
        try:
            library = ctypes.util.find_library(name)
        except OSError:  # where ldconfig has no entry it links a probe with gcc into a temporary
            continue  # file, and a read-only or missing TMPDIR makes that raise: not found
        if library:
            return library
    return None


def prepare(choice: str, environ: MutableMapping[str, str]) -> str:
    """Set the environment the model processes will be spawned with; return what they will use.

    An allocator the operator already preloads (LD_PRELOAD naming a malloc, e.g. jemalloc) is left
    as it is. Raises AllocatorNotFound when tcmalloc was asked for and is not installed.
    """
    if choice == "glibc":
        return "glibc"
    preloaded = environ.get("LD_PRELOAD", "")
    if "malloc" in preloaded:
        return f"preloaded by LD_PRELOAD ({preloaded})"
    library = find_tcmalloc()
    if library is None:
        if choice == "tcmalloc":
            raise AllocatorNotFound("--allocator tcmalloc: gperftools' tcmalloc is not installed "
                                    "(Debian/Ubuntu: apt install libtcmalloc-minimal4)")
        return "glibc"
    environ["LD_PRELOAD"] = f"{library} {preloaded}".strip()  # the loader splits on spaces or colons
    for name, value in _QUIET_LARGE_ALLOCATIONS.items():
        environ.setdefault(name, value)
    return f"tcmalloc ({library})"
