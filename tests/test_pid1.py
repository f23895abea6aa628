"""The front as a container's PID 1: `python -m pipeserve` as the init of its own PID namespace.

No container runtime runs on the test machines; `unshare --pid --fork --mount-proc` gives the
server what a container gives it: a PID namespace in which it is PID 1, whose orphans it inherits,
and for which the kernel has no default signal actions.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Server, client_session, held_batch, wait_until

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]
PIPELINE = ["--pipeline", "custom_pipelines:make"]


def _unshare_refusal() -> str | None:
    """Why a PID namespace cannot be made here (not root, or a sandbox that forbids it), or None."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux)"
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if probe.returncode != 0:
        return f"unshare refused: {probe.stderr.strip() or probe.returncode}"
    return None


_REFUSAL = _unshare_refusal()
pytestmark = [pytest.mark.skipif(_REFUSAL is not None, reason=str(_REFUSAL)),
              pytest.mark.timeout(180)]


def _start_as_init(start_server: Callable[..., Server], *args: str) -> Server:
    command = [*UNSHARE, sys.executable, "-m", "pipeserve", "--host", "127.0.0.1", "--port", "0"]
    return start_server(*PIPELINE, *args, command=command)


def _front_pid(server: Server) -> int:
    """The front's pid as this (outer) namespace sees it: the one child of `unshare --fork`."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    pids = wait_until(lambda: children.read_text().split(), 10, message="unshare's child")
    assert len(pids) == 1, pids
    return int(pids[0])


def _in_a_namespace(inner_pid: int) -> list[str]:
    """The states of processes that are `inner_pid` inside a child PID namespace (zombies too)."""
    states = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        pids = status.get("NSpid", "").split()
        if len(pids) > 1 and pids[-1] == str(inner_pid):
            states.append(status["State"].strip())
    return states


def test_serves_as_pid_1_reaps_orphans_and_drains_on_sigterm(start_server: Callable[..., Server],
                                                             tmp_path: Path) -> None:
    server = _start_as_init(start_server)
    assert "(front pid=1)" in server.wait_log("listening on")
    front = _front_pid(server)
    reply = server.post_json({"inputs": "hello"})
    assert reply.status == 200, reply.body
    # The model process knows its parent: it is the front (PID 1 inside), and it did not exit.
    assert server.info()["workers"][0]["restarts"] == 0

    # A grandchild the model process leaves behind is re-parented to the front; once it exits,
    # only the front can reap it.
    pid_file = tmp_path / "orphan"
    reply = server.post_json({"inputs": f"ORPHAN:{pid_file}"})
    assert reply.status == 200, reply.body
    orphan = int(pid_file.read_text())
    try:
        wait_until(lambda: not _in_a_namespace(orphan), 10, message=f"orphan pid={orphan} reaped")
    except AssertionError:
        raise AssertionError(f"{_in_a_namespace(orphan)}\n{server.log}") from None
    assert server.process.poll() is None

    # SIGTERM, for which PID 1 has no default action, drains the request in flight and exits 0.
    async def drain() -> None:
        async with client_session() as session, held_batch(session, server, tmp_path / "gate") as held:
            os.kill(front, signal.SIGTERM)
            server.wait_log("SIGTERM received")
            assert server.request("GET", "/ready").status == 503
            held.release()
            answer = await held.tasks[0]
            assert answer.status == 200, answer.body

    asyncio.run(drain())
    assert server.wait_exit(30) == 0
    assert "stopped (exit code 0)" in server.log
    assert "Traceback" not in server.log


def test_sigint_as_pid_1_stops_cleanly(start_server: Callable[..., Server]) -> None:
    server = _start_as_init(start_server)
    front = _front_pid(server)
    os.kill(front, signal.SIGINT)
    assert server.wait_exit(30) == 0
    assert "SIGINT received" in server.log
    assert "Traceback" not in server.log


def test_a_sigterm_before_the_event_loop_runs_is_kept(start_server: Callable[..., Server]) -> None:
    """As PID 1, a SIGTERM that arrives while the front still imports would be dropped; it is
    recorded from the first line and acted on at once: no model process is even started."""
    program = ("from pipeserve.front import early; early.install(); import os, signal; "
               "os.kill(os.getpid(), signal.SIGTERM); from pipeserve.front.cli import main; raise SystemExit(main())")
    server = start_server(*PIPELINE, command=[*UNSHARE, sys.executable, "-c", program, "--host", "127.0.0.1",
                                              "--port", "0"], ready=False)
    assert server.wait_exit(30) == 0
    assert "SIGTERM received" in server.log and "starting" not in server.log
    assert "Traceback" not in server.log
