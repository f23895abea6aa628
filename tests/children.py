"""Small torch-free model processes for the in-process supervisor tests, and one wrapper of the
real model process (for a server test, through `front_with_entry_point`).

Each is an entry point the front can start by name (`children:<name>`), speaking the real pipe
protocol over the real Connection; each misbehaves in one way a model process can. Gates are
files: the child waits for a path to exist, so a test releases it instead of sleeping.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from pipeserve import ipc
from pipeserve.ipc import ErrorKind, ExitCode, ParamSpec, ParamType

GATE_ENV = "TEST_CHILD_GATE"  # a path: slow_load waits for it before Ready, "GATE" inputs before answering


def _ready(protocol_version: int = ipc.PROTOCOL_VERSION) -> ipc.Ready:
    return ipc.Ready(protocol_version=protocol_version, pid=os.getpid(), model="", task="echo",
                     device="cpu", dtype="float32", load_seconds=0.01, versions={},
                     parameters=(ParamSpec("suffix", ParamType.STRING),))


def _send(conn: Any, message: Any) -> None:
    conn.send_bytes(ipc.encode(message))


def _wait_for_gate() -> None:
    gate = os.environ[GATE_ENV]
    while not os.path.exists(gate):
        time.sleep(0.01)


def _answer(text: str, suffix: str) -> ipc.Outcome:
    if text == "CRASH":
        os._exit(9)
    if text == "SEGV":
        os.kill(os.getpid(), signal.SIGSEGV)
    if text == "HANG":
        while True:
            time.sleep(3600)
    if text == "GATE":
        _wait_for_gate()
    if text == "BAD":
        return ipc.Failed(ErrorKind.BAD_INPUT, "bad input")
    return ipc.Ok(text + suffix)


def _serve(conn: Any, wrong_id_first: bool = False) -> None:
    while True:
        try:
            message = ipc.decode(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(ExitCode.PIPE_CLOSED)
        if isinstance(message, ipc.Shutdown):
            os._exit(ExitCode.OK)
        assert isinstance(message, ipc.Batch)
        outcomes = [_answer(text, message.parameters.get("suffix", "")) for text in message.inputs]
        if wrong_id_first:
            _send(conn, ipc.BatchResult(message.batch_id + 1000, outcomes, 0.001, 1))
        _send(conn, ipc.BatchResult(message.batch_id, outcomes, 0.001, 1))


def echo(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Serves: each input answered as itself plus the `suffix` parameter."""
    _send(conn, _ready())
    _serve(conn)


def slow_load(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Loads only once the gate file exists, then serves like echo."""
    _wait_for_gate()
    echo(conn, spec)


def fatal(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Cannot load: says why and exits with LOAD_FAILED."""
    _send(conn, ipc.Fatal(reason="cannot load model 'x': weights are corrupt", detail="Traceback ..."))
    os._exit(ExitCode.LOAD_FAILED)


def die_loading(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Dies before it says anything."""
    os._exit(5)


def wrong_protocol(conn: Any, spec: ipc.WorkerSpec) -> None:
    _send(conn, _ready(protocol_version=ipc.PROTOCOL_VERSION + 1))
    _serve(conn)


def garbage_frame(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Ready, then a frame that is not a protocol message in answer to the first batch."""
    _send(conn, _ready())
    conn.recv_bytes()
    conn.send_bytes(b"\x80\x05not a pickle at all")
    time.sleep(3600)


def unknown_batch_id(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Answers every batch twice: first under an id the front never sent, then correctly."""
    _send(conn, _ready())
    _serve(conn, wrong_id_first=True)


def ignore_shutdown(conn: Any, spec: ipc.WorkerSpec) -> None:
    """Serves, but never exits when told to: the front must kill it."""
    _send(conn, _ready())
    while True:
        message = ipc.decode(conn.recv_bytes())
        if isinstance(message, ipc.Batch):
            outcomes = [ipc.Ok(text) for text in message.inputs]
            _send(conn, ipc.BatchResult(message.batch_id, outcomes, 0.001, 1))


def model_past_its_memory_limit_once_serving(conn: Any, spec: ipc.WorkerSpec) -> None:
    """The real model process (pipeserve.model_proc.main, a real model) whose memory reads as
    past any --max-worker-memory once it has loaded: the drain and the restart, without growing
    a process by gigabytes. Started through FRONT_WITH_ENTRY_POINT."""
    from pipeserve import model_proc
    from pipeserve.model import memory

    serve, step = model_proc._serve, model_proc._step
    steps = 0

    def serve_past_the_limit(conn: Any, call: Any, engine: Any, spec: ipc.WorkerSpec) -> int:
        memory.rss_bytes = lambda: 1 << 50  # type: ignore[assignment]
        return serve(conn, call, engine, spec)

    def step_after_the_gate(engine: Any) -> ipc.Step:  # the first step, then none until the gate opens
        nonlocal steps
        steps += 1
        if steps == 2 and GATE_ENV in os.environ:
            _wait_for_gate()
        return step(engine)

    model_proc._serve = serve_past_the_limit  # type: ignore[assignment]
    model_proc._step = step_after_the_gate  # type: ignore[assignment]
    model_proc.main(conn, spec)


def front_with_entry_point(name: str) -> list[str]:
    """A command that runs `python -m pipeserve` with the model process `children:<name>` (run
    with this directory on PYTHONPATH, so that the spawned process can import it)."""
    import sys

    code = ("from pipeserve import ipc; ipc.MODEL_ENTRY_POINT = " + repr(f"children:{name}") + "; "
            "from pipeserve.front import early; early.install(); "
            "from pipeserve.front.cli import main; raise SystemExit(main())")
    return [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", "0"]
