"""One model process and the pipe to it: spawn, Ready, one batch at a time, death.

The socket is read and written with asyncio streams, never blocking the event loop; the
process's death is noticed from `process.sentinel` through `loop.add_reader` (no polling), and
reported with its cause ("killed by SIGKILL — out of memory?").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from pipeserve import ipc
from pipeserve.front import init
from pipeserve.front.streams import Streams
from pipeserve.ipc import ExitCode

log = logging.getLogger("pipeserve.supervisor")

SHUTDOWN_GRACE_S = 5.0
_EXIT_STATUS_POLL_S = 0.005
_EXIT_STATUS_WAIT_S = 2.0


class WorkerDied(Exception):
    """The model process exited; `cause` says how ("killed by SIGKILL — out of memory?")."""

    def __init__(self, cause: str, exitcode: int | None, sent: bool = True) -> None:
        super().__init__(cause)
        self.cause = cause
        self.exitcode = exitcode
        self.sent = sent  # False: the batch never reached the process, so it never ran


class LoadFailed(Exception):
    """The model process reported it cannot load the model (a one-line reason)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class LoadTimedOut(Exception):
    """The model process did not send Ready within --load-timeout; it has been killed."""


class BatchTimeout(Exception):
    """A batch ran past --batch-timeout; the worker has been killed."""


def describe_exit(exitcode: int | None, killed_for: str | None = None) -> str:
    """How a model process ended; `killed_for` is why the front killed it, if it did."""
    if exitcode is None:
        return "exited (status unknown)"
    if killed_for is not None and exitcode == -signal.SIGKILL:
        return f"killed by the front with SIGKILL ({killed_for})"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " — out of memory?" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    descriptions: dict[int, str] = {
        ExitCode.OK: "exited normally",
        ExitCode.LOAD_FAILED: "failed to load the model",
        ExitCode.MEMORY_LIMIT: "exceeded --max-worker-memory and exited for a restart",
        ExitCode.PIPE_CLOSED: "lost its pipe to the front",
        ExitCode.DEVICE_ERROR: "exited after a device error that breaks its CUDA context",
    }
    return descriptions.get(exitcode, f"exited with code {exitcode}")


class WorkerProcess:
    """One model process and the pipe to it."""

    def __init__(self, spec: ipc.WorkerSpec, context: Any,
                 entry_point: str = ipc.MODEL_ENTRY_POINT, streams: Streams | None = None) -> None:
        self.spec = spec
        self._context = context
        self._entry_point = entry_point
        self._streams = streams
        self.process: Any = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._spawning: asyncio.Future[None] | None = None
        self._exit_task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[ipc.Ready] | None = None
        self._pending: tuple[int, asyncio.Future[ipc.BatchResult]] | None = None
        self.exited: asyncio.Future[WorkerDied] | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.last_heard_at = 0.0  # when the process last sent anything: streams.py watches it
        self.served_streams = 0  # streams it ended without an error: generation it served
        self.draining = False  # over --max-worker-memory: no new work; Retire once it holds none
        self._retiring: asyncio.Task[None] | None = None
        self.killed_for: str | None = None  # why the front killed it: its death is no mystery

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self, load_timeout: float) -> ipc.Ready:
        """Spawn the process and wait for Ready; raises LoadFailed, LoadTimedOut or WorkerDied."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        # Whoever stops waiting for Ready (a load timeout, a stop while loading) leaves its
        # outcome unread; it is settled all the same, so it is marked read here.
        self._ready.add_done_callback(_mark_read)
        self.exited = loop.create_future()
        parent_end, child_end = self._context.Pipe(duplex=True)
        self.process = self._context.Process(
            target=ipc.run_entry_point, args=(self._entry_point, child_end, self.spec),
            name=f"pipeserve-worker-{self.spec.worker_index}")
        # Spawning forks, execs and writes the preparation data to a pipe: off the event loop.
        # Shielded: a stop() that cancels us meanwhile must find the spawn finished to kill it.
        self._spawning = asyncio.ensure_future(asyncio.to_thread(self.process.start))
        with init.spawning():
            await asyncio.shield(self._spawning)
        self.started_at = time.monotonic()
        child_end.close()  # so that we see EOF when the child dies
        sock = socket.socket(fileno=os.dup(parent_end.fileno()))
        parent_end.close()
        sock.setblocking(False)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
        self._reader_task = asyncio.create_task(self._read_loop(reader))
        loop.add_reader(self.process.sentinel, self._on_sentinel)
        log.info("%s pid=%d starting", self.spec.worker_name, self.process.pid)
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), load_timeout)
        except TimeoutError:
            self.kill(f"not loaded within --load-timeout {load_timeout:g}s")
            raise LoadTimedOut() from None

    async def run(self, batch: ipc.Batch, timeout: float) -> ipc.BatchResult:
        """Send one batch and wait for its result; raises WorkerDied or BatchTimeout."""
        assert self._writer is not None and self.exited is not None
        if self.exited.done():
            raise self.exited.result()
        future: asyncio.Future[ipc.BatchResult] = asyncio.get_running_loop().create_future()
        self._pending = (batch.batch_id, future)
        try:
            try:
                await ipc.write_message(self._writer, batch)
            except (ConnectionError, OSError):  # dead before the batch could be sent
                died = await asyncio.shield(self.exited)
                raise WorkerDied(died.cause, died.exitcode, sent=False) from None
            # Not asyncio.wait_for: on Python 3.11 a result arriving as the task is cancelled
            # (the server stopping) is returned and the cancellation lost; the dispatch loop
            # then waited for its next batch forever and the stop never ended.
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:  # before OSError, of which it is a subclass
            self.kill(f"a batch ran past --batch-timeout {timeout:g}s")
            raise BatchTimeout() from None
        except (ConnectionError, OSError):
            raise await asyncio.shield(self.exited) from None
        finally:
            self._pending = None
            self.retire_when_idle()

    async def send(self, message: ipc.Generate | ipc.Cancel) -> None:
        """Send a stream message; ConnectionError when the worker is gone."""
        if self._writer is None or self.exited is None or self.exited.done():
            raise ConnectionError("the model process has exited")
        await ipc.write_message(self._writer, message)

    def takes_new_work(self) -> bool:
        """False once past --max-worker-memory (a method: the flag changes across awaits)."""
        return not self.draining

    def retire_when_idle(self) -> None:
        """Past --max-worker-memory, send Retire once no batch and no open stream of this process
        is left (called whenever one ends): everything sent before it is served first."""
        if not self.draining or self._retiring is not None or self._pending is not None:
            return
        if self.exited is None or self.exited.done():
            return
        if self._streams is not None and self._streams.held_by(self):
            return
        log.info("%s pid=%s: past --max-worker-memory and idle; retiring it", self.spec.worker_name, self.pid)
        self._retiring = asyncio.ensure_future(self._send_retire())

    async def _send_retire(self) -> None:
        if self._writer is None:
            return
        try:
            await ipc.write_message(self._writer, ipc.Retire())
        except (ConnectionError, OSError):
            pass  # gone already: its death is reported as any other

    def kill(self, reason: str) -> None:
        """SIGKILL the process, remembering why: its death is then reported as the front's doing."""
        if self.process is not None and self.process.exitcode is None:
            self.killed_for = self.killed_for or reason
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Ask the worker to exit; kill it if it has not within `grace` seconds."""
        if self.exited is None or self.exited.done():
            return
        if self._reader_task is None and self._spawning is not None:
            # Stopped while spawning (start() was cancelled): nothing watches its death yet.
            await asyncio.gather(asyncio.shield(self._spawning), return_exceptions=True)
            self.kill("stopped while starting")
            await asyncio.to_thread(self.process.join, grace)
            exitcode = self.process.exitcode
            self.exited.set_result(WorkerDied(describe_exit(exitcode, self.killed_for), exitcode))
            return
        if self._ready is not None and not self._ready.done():
            # Still loading: it reads no message until it has loaded, which may take minutes.
            self.kill("stopped while loading")
            await asyncio.shield(self.exited)
            return
        try:
            if self._writer is not None:
                await asyncio.wait_for(ipc.write_message(self._writer, ipc.Shutdown()), grace)
            await asyncio.wait_for(asyncio.shield(self.exited), grace)
        except (TimeoutError, ConnectionError, OSError):
            log.warning("%s pid=%s did not exit in %.0fs; killing it",
                        self.spec.worker_name, self.pid, grace)
            self.kill(f"did not exit within {grace:g}s of Shutdown")
            await asyncio.shield(self.exited)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await ipc.read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except ipc.ProtocolError as exc:
                log.error("%s sent a bad frame (%s); killing it", self.spec.worker_name, exc)
                self.kill("it sent a bad frame")
                return
            self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        assert self._ready is not None
        self.last_heard_at = time.monotonic()
        if isinstance(message, ipc.Ready):
            if message.protocol_version != ipc.PROTOCOL_VERSION:
                self._ready.set_exception(LoadFailed(
                    f"worker speaks protocol {message.protocol_version}, "
                    f"front speaks {ipc.PROTOCOL_VERSION}", ""))
            elif not self._ready.done():
                self.ready_at = time.monotonic()
                self._ready.set_result(message)
        elif isinstance(message, ipc.Fatal):
            if not self._ready.done():
                self._ready.set_exception(LoadFailed(message.reason, message.detail))
        elif isinstance(message, ipc.Step):
            self.served_streams += sum(end.error is None for end in message.ended)
            self.draining = self.draining or message.draining
            if self._streams is not None:
                self._streams.deliver(message)
            self.retire_when_idle()
        elif isinstance(message, ipc.BatchResult):
            self.draining = self.draining or self.spec.past_memory_limit(message.rss_bytes)  # as the process reads it
            if self._pending and self._pending[0] == message.batch_id and not self._pending[1].done():
                self._pending[1].set_result(message)
            else:
                log.warning("%s answered unknown batch %d", self.spec.worker_name, message.batch_id)

    def _on_sentinel(self) -> None:
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        self._exit_task = asyncio.create_task(self._finish_exit())

    async def _finish_exit(self) -> None:
        # Read what the child wrote before it died (a result sent just before a planned exit)
        # before failing anything; the socket reaches EOF right after the sentinel fires.
        assert self._reader_task is not None and self.exited is not None
        await asyncio.wait({self._reader_task}, timeout=1.0)
        exitcode = self.process.exitcode
        deadline = time.monotonic() + _EXIT_STATUS_WAIT_S
        while exitcode is None and time.monotonic() < deadline:
            await asyncio.sleep(_EXIT_STATUS_POLL_S)  # the sentinel fires just before the reap
            exitcode = self.process.exitcode
        died = WorkerDied(describe_exit(exitcode, self.killed_for), exitcode)
        if self._writer is not None:
            self._writer.close()
        self._reader_task.cancel()
        for future in (self._ready, self._pending[1] if self._pending else None):
            if future is not None and not future.done():
                future.set_exception(died)
        self.exited.set_result(died)
        if self._streams is not None:
            self._streams.worker_died(self, died.cause)


def _mark_read(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
