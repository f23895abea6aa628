"""Restart policy for one worker slot: start, watch, restart with backoff, or give up.

A `Supervisor` owns one slot: it starts a `WorkerProcess` (worker.py), hands it to its
`Dispatcher` (dispatch.py) while it serves, and when it dies restarts it with exponential
backoff, giving up (telling the runtime to exit) on a crash loop or a load failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import multiprocess

from pipeserve import ipc
from pipeserve.front import errors, machine
from pipeserve.front.batcher import Batcher
from pipeserve.front.config import Config
from pipeserve.front.dispatch import BatchObserver, Dispatcher
from pipeserve.front.streams import Streams
from pipeserve.front.worker import LoadFailed, LoadTimedOut, WorkerDied, WorkerProcess
from pipeserve.ipc import ExitCode, WorkerState

log = logging.getLogger("pipeserve.supervisor")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_STRETCH_S = 30.0  # a worker that served this long resets the backoff


class Backoff:
    """Exponential restart delay: 0.5 s doubling to 30 s; reset after a healthy stretch."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, maximum: float = BACKOFF_MAX_S) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.initial


def worker_spec(config: Config, model: str, index: int, allocator: str = "glibc",
                log_name: str = "") -> ipc.WorkerSpec:
    """What the model process in slot `index` is started with."""
    device = config.worker_device(index)
    visible = None
    if config.devices and device.startswith("cuda:"):
        visible, device = machine.physical_gpu(device, os.environ), "cuda:0"
    return ipc.WorkerSpec(
        model=model, task=config.task, pipeline=config.pipeline, device=device,
        visible_devices=visible, dtype=config.dtype, threads=config.torch_threads(),
        max_worker_memory=config.max_worker_memory, log_level=config.log_level,
        log_format=config.log_format, worker_index=index,
        worker_name=f"{log_name}/worker[{index}]" if log_name else f"worker[{index}]",
        max_running_sequences=config.max_running_sequences, prefix_cache_bytes=config.prefix_cache_bytes,
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        parent_pid=os.getpid(), max_image_pixels=config.max_image_pixels, allocator=allocator)


class Supervisor:
    """Keeps one worker slot serving batches from the shared batcher."""

    def __init__(self, index: int, config: Config, model: str, batcher: Batcher,
                 on_fatal: Callable[[ExitCode, str], None], others_serving: Callable[[], bool],
                 on_batch: BatchObserver | None = None,
                 on_change: Callable[[], None] | None = None,
                 entry_point: str = ipc.MODEL_ENTRY_POINT,
                 backoff: Backoff | None = None, streams: Streams | None = None,
                 allocator: str = "glibc", log_name: str = "") -> None:
        self.index = index
        self.config = config
        self.batcher = batcher
        self.device = config.worker_device(index)
        self.spec = worker_spec(config, model, index, allocator, log_name)
        self.name = self.spec.worker_name
        self.dispatcher = Dispatcher(index, batcher, config.max_batch_size, config.batch_timeout,
                                     self.retry_after, on_batch)
        self._entry_point = entry_point
        self._streams = streams
        self._context = multiprocess.get_context("spawn")
        self._on_fatal = on_fatal
        self._others_serving = others_serving
        self._on_change = on_change
        self._state = WorkerState.LOADING
        self.worker: WorkerProcess | None = None
        self.ready: ipc.Ready | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self._deaths: deque[float] = deque()
        self._backoff = backoff or Backoff()
        self._stopping = False
        self.restart_at: float | None = None

    @property
    def state(self) -> WorkerState:
        return self._state

    @state.setter
    def state(self, value: WorkerState) -> None:
        if value != self._state:
            self._state = value
            if self._on_change is not None:
                self._on_change()

    def stopping(self) -> bool:
        """Whether stop() was called (a call: its answer changes across awaits)."""
        return self._stopping

    @property
    def serving(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def draining(self) -> bool:
        """Serving, but past --max-worker-memory: it finishes its work, takes no new work, and
        is then restarted."""
        return self.serving and self.worker is not None and not self.worker.takes_new_work()

    async def run(self) -> None:
        """The slot's whole life: start, serve, and restart until stopped or given up."""
        first = True
        while not self.stopping():
            self.state = WorkerState.LOADING if first else WorkerState.RESTARTING
            spec = self.spec if first else dataclasses.replace(self.spec, first_start=False)
            worker = WorkerProcess(spec, self._context, self._entry_point, self._streams)
            self.worker = worker
            try:
                ready = await worker.start(self.config.load_timeout)
            except LoadTimedOut:
                name = self.spec.model or self.spec.pipeline
                self._give_up(ExitCode.LOAD_TIMEOUT, f"model {name!r} did not load within --load-timeout "
                                                     f"{self.config.load_timeout:g}s; giving up")
                return
            except LoadFailed as exc:
                worker.kill("it reported that it cannot load the model")
                log.debug("load failure detail:\n%s", exc.detail)
                self._give_up(ExitCode.LOAD_FAILED, exc.reason)
                return
            except WorkerDied as exc:
                if first:
                    name = self.spec.model or self.spec.pipeline
                    self._give_up(ExitCode.LOAD_FAILED,
                                  f"cannot load model {name!r}: worker {exc.cause} while loading")
                    return
                died = exc
            else:
                first = False
                self.ready = ready
                self.state = WorkerState.READY
                log.info("%s pid=%d ready in %.1fs", self.name, worker.pid, ready.load_seconds)
                died = await self.dispatcher.serve(worker, self._killed)
            if self.stopping():  # stop() ran while this slot awaited
                return
            if not await self._after_death(worker, died):
                return

    def _killed(self) -> None:
        self.state = WorkerState.RESTARTING  # not serving while its exit is collected

    async def _after_death(self, worker: WorkerProcess, died: WorkerDied) -> bool:
        """Log, fail what cannot be served, wait out the backoff; False when giving up."""
        self.state = WorkerState.RESTARTING
        self.last_exit = died.cause
        log.warning("%s pid=%s died: %s", self.name, worker.pid, died.cause)
        planned = died.exitcode == ExitCode.MEMORY_LIMIT
        # Queued jobs wait for a planned restart (a reload, bounded by their own deadlines).
        if not planned and not self._others_serving():
            failed = self.batcher.fail_queued(
                lambda: errors.WorkerCrashed("the model process is restarting", retry_after=self.retry_after()))
            if failed:
                log.warning("answered %d queued jobs with 503 while the worker restarts", failed)
        now = time.monotonic()
        # A crash loop is a worker that cannot stay up: it died loading, or before it finished
        # one batch or ended one stream well since it became ready (a stream that kills it at its
        # tenth token serves nothing). A worker killed after serving is restarted every time.
        looping = worker.ready_at is None or (self.dispatcher.completed == 0 and worker.served_streams == 0)
        if not planned:
            if looping and self._crash_loop(now):
                return False
            # The backoff grows only while the worker cannot stay up: one that served (or ran
            # for a healthy stretch) and was then killed from outside is back after the first step.
            if not looping or now - worker.started_at >= HEALTHY_STRETCH_S:
                self._backoff.reset()
        delay = 0.0 if planned else self._backoff.next_delay()
        self.restarts += 1
        self.restart_at = now + delay
        log.info("%s restart #%d in %.1fs", self.name, self.restarts, delay)
        await asyncio.sleep(delay)
        self.restart_at = None
        return True

    def _crash_loop(self, now: float) -> bool:
        """Count this death; give up (True) past --max-restarts within --restart-window."""
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.config.restart_window:
            self._deaths.popleft()
        if len(self._deaths) <= self.config.max_restarts:
            return False
        self._give_up(ExitCode.CRASH_LOOP,
                      f"worker died {len(self._deaths)} times within {self.config.restart_window:g}s "
                      f"(--max-restarts {self.config.max_restarts}); giving up")
        return True

    def retry_after(self) -> int:
        """Seconds until this slot is likely serving again (restart delay plus a load)."""
        wait = (self.restart_at or time.monotonic()) - time.monotonic()
        load = self.ready.load_seconds if self.ready else 1.0
        return max(1, int(wait + load + 0.999))

    def describe(self) -> dict[str, Any]:
        """This slot for /info."""
        worker = self.worker
        return {
            "index": self.index,
            "state": self.state.value,
            "pid": worker.pid if worker else None,
            "device": self.device,
            "uptime_seconds": round(time.monotonic() - worker.started_at, 3)
            if worker and self.serving else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "draining": self.draining,
            "threads": self.spec.threads,
        }

    def _give_up(self, exit_code: ExitCode, reason: str) -> None:
        self.state = WorkerState.FAILED
        self._on_fatal(exit_code, reason)

    async def stop(self) -> None:
        """Stop restarting and shut the current worker down (after the batcher has drained)."""
        self._stopping = True
        self.state = WorkerState.STOPPED
        if self.worker is not None:
            await self.worker.stop()
