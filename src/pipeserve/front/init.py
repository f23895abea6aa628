"""What the front must do when it is its PID namespace's init: a container's PID 1.

The kernel treats PID 1 apart in two ways that matter here. A signal it has no handler for is
not acted on at all (SIGTERM from `docker stop` or the kubelet would be ignored until the
SIGKILL that follows), so the front records SIGTERM from its first line (early.py) until its
event loop handles it. And every orphan in the namespace is re-parented to it: a process that a
model process left behind (a helper a library forked, a grandchild of a custom pipeline) becomes
the front's child, and once it exits, a zombie that only the front can reap. `reap_orphans`
does that on each SIGCHLD without taking the exit status of a model process away from
`multiprocess`, which reports it ("killed by SIGKILL").
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import multiprocess

log = logging.getLogger("pipeserve")

# At most this many zombies are reaped per SIGCHLD; more wait for the next one.
_MOST_PER_SIGNAL = 1000


def is_init() -> bool:
    """Whether this process is its PID namespace's init (PID 1)."""
    return os.getpid() == 1


_spawns_under_way = 0


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Around a model process's spawn: until multiprocess has recorded it as a child, a death of
    it would look like an orphan's, so no reaping meanwhile (the next SIGCHLD reaps)."""
    global _spawns_under_way  # noqa: PLW0603 - shared by the spawns and the SIGCHLD handler
    _spawns_under_way += 1
    try:
        yield
    finally:
        _spawns_under_way -= 1


def reap_orphans() -> int:
    """Reap every exited child that is not one of our model processes; return how many.

    Our own model processes are reaped by `multiprocess` (active_children), which keeps their
    exit codes. Any other zombie child is an orphan re-parented to us: it is looked at without
    being reaped (WNOWAIT) and reaped only once it is known not to be ours.
    """
    reaped = 0
    if _spawns_under_way:
        return reaped
    for _ in range(_MOST_PER_SIGNAL):
        ours = {process.pid for process in multiprocess.active_children()}  # reaps ours that exited
        try:
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            break
        if exited is None:
            break
        if exited.si_pid in ours:
            continue  # one of ours exited since active_children(): it is reaped on the next turn
        try:
            os.waitpid(exited.si_pid, os.WNOHANG)
        except ChildProcessError:
            continue
        reaped += 1
        log.debug("reaped orphaned process pid=%d (exit status %d)", exited.si_pid, exited.si_status)
    return reaped
