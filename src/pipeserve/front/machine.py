"""What the front can tell of the machine before any model process starts: its cores (a
container's cpuset and CPU quota included), whether a GPU is likely, whether a model generates
text. The front never imports torch; what it reads here it reads once, at import, or from a
cache, so that no event loop waits on a file."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping

from pipeserve.ipc import GENERATION_ARCHITECTURES, GENERATION_TASK


def nvidia_device_present(devices: str = "/dev") -> bool:
    """Whether a GPU's device node of the NVIDIA driver is here: /dev/nvidiaN for any N (a
    Kubernetes pod given GPU 3 sees /dev/nvidia3 alone), not nvidiactl or nvidia-uvm."""
    try:
        names = os.listdir(devices)
    except OSError:
        return False
    return any(name.startswith("nvidia") and name[len("nvidia"):].isdigit() for name in names)


def physical_gpu(device: str, environ: Mapping[str, str]) -> str:
    """What a worker for `--devices cuda:N` (`device`) sets CUDA_VISIBLE_DEVICES to: the Nth GPU
    this process was given. A scheduler that sets CUDA_VISIBLE_DEVICES itself (Slurm, a container
    runtime, as "2,3", GPU UUIDs or MIG ids) numbers what it gave from 0, as torch does; N alone
    would name the machine's Nth GPU. ValueError when there is no Nth."""
    index = int(device.split(":", 1)[1])
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return str(index)
    gpus = [] if gpus_hidden(environ) else [gpu.strip() for gpu in given.split(",") if gpu.strip()]
    if index >= len(gpus):
        raise ValueError(f"cuda:{index} is not among the {len(gpus)} GPUs CUDA_VISIBLE_DEVICES={given!r} gives")
    return gpus[index]


def gpus_hidden(environ: Mapping[str, str]) -> bool:
    """CUDA_VISIBLE_DEVICES set to none ("" or -1, the usual ways to keep a job off the GPUs):
    torch finds no CUDA device, whatever device nodes there are."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    return given is not None and given.strip() in ("", "-1")


# The front has no torch to ask whether `--device auto` will find CUDA; the NVIDIA driver's
# device nodes say, unless the GPUs are hidden. Looked up once, at import, so that no event loop
# ever waits on the listing.
NVIDIA_DEVICE_PRESENT = nvidia_device_present() and not gpus_hidden(os.environ)


# On a CPU, one single-threaded worker per core served the most: 1.4x one worker using both cores
# at 64 clients on the 2-core bench machine (bench/TUNING.md). Each worker holds its own copy of
# the model, so `auto` stops at a few; more cores then go to each worker's torch threads.
MAX_AUTO_WORKERS = 4
# Default most padded tokens in a batch. On a CPU a matrix product reaches its speed at a few
# hundred rows (all-MiniLM-L6-v2, one thread: the same time per token at 400 rows as at 1,232),
# so a bigger batch only holds a model process longer while others wait: at 64 clients on the
# bench mix, 768 served +3.7 % req/s at a 7 % lower p99 than 8192 (bench/TUNING.md, five
# alternating rounds). A GPU needs big batches to be busy; its default is the earlier one.
CPU_BATCH_TOKENS = 768
GPU_BATCH_TOKENS = 8192
# Default least share of real tokens in a length-ordered batch: on a CPU every padded token costs
# as much as a real one (0.85 served best, bench/TUNING.md); a GPU pads nearly for free.
CPU_MIN_BATCH_FILL = 0.85
GPU_MIN_BATCH_FILL = 0.0


def gpu_likely(device: str) -> bool:
    """Whether the worker's device is (or, for auto, will resolve to) a GPU."""
    if device.startswith("cuda"):
        return True
    return device == "auto" and NVIDIA_DEVICE_PRESENT


@functools.lru_cache
def generates_text(model: str | None, task: str | None) -> bool:
    """Whether the model generates text, as far as can be told before it loads.

    One process with every core serves generated streams best (bench/GENERATION.md: 1 worker x 2
    threads against 2 x 1 here, 41 against 26 tokens/s for a lone stream, 216 against 191 at 16
    streams), and a generator is often too big to load twice. Read once: the answer is cached.
    """
    if task is not None:
        return task == GENERATION_TASK
    if not model:  # the embedded embedder, or a --pipeline factory: not ./config.json
        return False
    try:
        with open(os.path.join(model, "config.json")) as handle:
            architectures = json.load(handle).get("architectures") or []
    except (OSError, ValueError, AttributeError):  # a hub id, the embedded model, an odd file
        return False
    return any(str(name).endswith(GENERATION_ARCHITECTURES) for name in architectures)


def cores() -> int:
    """CPUs this process may use: its affinity mask (a container's cpuset), lowered to its cgroup's
    CPU quota rounded up (`docker run --cpus`, a Kubernetes CPU limit, systemd's CPUQuota=).

    A container limited to 2 CPUs on a 64-core host sees 64 in its affinity mask; sized from
    that, 4 workers x 16 threads would share 2 CPUs' worth of time.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    quota = CGROUP_CPU_QUOTA
    return max(1, min(available, math.ceil(quota))) if quota else available


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> float | None:
    """The CPUs' worth of time this process's cgroup (or a parent of it) allows, or None."""
    try:
        with open(membership) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max holds "<quota> <period>" or "max <period>"
            limits += [_quota(os.path.join(root, d, "cpu.max"), None) for d in _and_parents(path)]
        elif "cpu" in controllers.split(","):  # cgroup v1: the quota and period in two files,
            # under the hierarchy's mount: named for its controllers ("cpu,cpuacct") or "cpu" alone
            for base in dict.fromkeys((os.path.join(root, controllers), os.path.join(root, "cpu"))):
                limits += [_quota(os.path.join(base, d, "cpu.cfs_quota_us"), os.path.join(base, d, "cpu.cfs_period_us"))
                           for d in _and_parents(path)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _and_parents(path: str) -> list[str]:
    """"/a/b" -> ["a/b", "a", ""]: a cgroup and each of its parents, relative to the root.

    Inside a container the cgroup namespace shows the container's own cgroup as the root.
    """
    parts = [part for part in path.split("/") if part]
    return ["/".join(parts[:end]) for end in range(len(parts), -1, -1)]


def _quota(quota_file: str, period_file: str | None) -> float | None:
    try:
        with open(quota_file) as handle:
            fields = handle.read().split()
        if period_file is not None:
            with open(period_file) as handle:
                fields.append(handle.read().strip())
        quota, period = fields[0], float(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    if quota in ("max", "-1") or period <= 0:
        return None
    return float(quota) / period


# Read once, at import, as the GPU's device node is: no event loop waits on these files.
CGROUP_CPU_QUOTA = cgroup_cpu_quota()
