"""Keeps each worker slot serving: feed batches, notice death, restart with backoff.

A `Supervisor` owns one slot: it starts a `WorkerProcess` (worker.py), pulls the next batch
from the batcher whenever its worker is idle, fails exactly that batch when the worker dies,
restarts it with exponential backoff, and gives up (telling the app to exit) on a crash loop
or a load failure.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import multiprocess

from pipeserve import errors, ipc, model_proc
from pipeserve.batcher import Batcher, Job, resolve
from pipeserve.config import Config
from pipeserve.worker import BatchTimeout, LoadFailed, WorkerDied, WorkerProcess

log = logging.getLogger("pipeserve.supervisor")

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_STRETCH_S = 30.0  # a worker that served this long resets the backoff
OOM_CAP_S = 60.0  # how long batches stay capped to the size that fit after an out-of-memory
_batch_ids = itertools.count(1)
# Called after each batch: (its jobs, when it was sent, compute seconds or None if it failed).
BatchObserver = Callable[[list[Job], float, "float | None"], None]


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


class Supervisor:
    """Keeps one worker slot serving batches from the shared batcher."""

    def __init__(self, index: int, config: Config, model: str, batcher: Batcher,
                 on_fatal: Callable[[int, str], None], others_serving: Callable[[], bool],
                 on_batch: BatchObserver | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.index = index
        self.config = config
        self.batcher = batcher
        device = config.worker_device(index)
        visible = None
        if config.devices and device.startswith("cuda:"):
            visible, device = device.split(":", 1)[1], "cuda:0"
        self.device = config.worker_device(index)
        self.spec = ipc.WorkerSpec(
            model=model, task=config.task, pipeline=config.pipeline, device=device,
            visible_devices=visible,
            dtype=config.dtype, threads=config.torch_threads(),
            max_worker_memory=config.max_worker_memory, log_level=config.log_level,
            log_format=config.log_format, worker_index=index)
        self._context = multiprocess.get_context("spawn")
        self._on_fatal = on_fatal
        self._others_serving = others_serving
        self._on_batch = on_batch
        self._on_change = on_change
        self._state = "loading"
        self.worker: WorkerProcess | None = None
        self.ready: ipc.Ready | None = None
        self.restarts = 0
        self.pipeline_calls = 0
        self.last_exit: str | None = None
        self._deaths: deque[float] = deque()
        self._backoff = Backoff()
        self._oom_cap: tuple[int, float] | None = None  # (size, until)
        self._stopping = False
        self.restart_at: float | None = None

    @property
    def state(self) -> str:
        """loading, ready, restarting, failed or stopped."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != self._state:
            self._state = value
            if self._on_change is not None:
                self._on_change()

    @property
    def serving(self) -> bool:
        return self.state == "ready"

    async def run(self) -> None:
        """The slot's whole life: start, serve, and restart until stopped or given up."""
        first = True
        while not self._stopping:
            self.state = "loading" if first else "restarting"
            worker = WorkerProcess(self.spec, self._context)
            self.worker = worker
            try:
                self.ready = await worker.start()
            except LoadFailed as exc:
                worker.kill()
                log.debug("load failure detail:\n%s", exc.detail)
                self._give_up(errors.EXIT_LOAD_FAILED, exc.reason)
                return
            except WorkerDied as exc:
                if first:
                    name = self.spec.model or self.spec.pipeline
                    self._give_up(errors.EXIT_LOAD_FAILED,
                                  f"cannot load model {name!r}: worker {exc.cause} while loading")
                    return
                died = exc
            else:
                first = False
                self.state = "ready"
                log.info("worker[%d] pid=%d ready in %.1fs", self.index, worker.pid,
                         self.ready.load_seconds)
                died = await self._serve(worker)
            if self._stopping:
                return
            if not await self._after_death(worker, died):
                return

    async def _after_death(self, worker: WorkerProcess, died: WorkerDied) -> bool:
        """Log, fail what cannot be served, wait out the backoff; False when giving up."""
        self.state = "restarting"
        self.last_exit = died.cause
        log.warning("worker[%d] pid=%s died: %s", self.index, worker.pid, died.cause)
        if not self._others_serving():
            failed = self.batcher.fail_queued(
                lambda: errors.WorkerCrashed("the model process is restarting", retry_after=self.retry_after()))
            if failed:
                log.warning("answered %d queued jobs with 503 while the worker restarts", failed)
        planned = died.exitcode == model_proc.EXIT_MEMORY_LIMIT
        now = time.monotonic()
        if not planned:
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > self.config.restart_window:
                self._deaths.popleft()
            if len(self._deaths) > self.config.max_restarts:
                self._give_up(errors.EXIT_CRASH_LOOP,
                              f"worker died {len(self._deaths)} times within "
                              f"{self.config.restart_window:g}s (--max-restarts "
                              f"{self.config.max_restarts}); giving up")
                return False
            if now - worker.started_at >= HEALTHY_STRETCH_S:
                self._backoff.reset()
        delay = 0.0 if planned else self._backoff.next_delay()
        self.restarts += 1
        self.restart_at = now + delay
        log.info("worker[%d] restart #%d in %.1fs", self.index, self.restarts, delay)
        await asyncio.sleep(delay)
        self.restart_at = None
        return True

    def retry_after(self) -> int:
        wait = (self.restart_at or time.monotonic()) - time.monotonic()
        load = self.ready.load_seconds if self.ready else 1.0
        return max(1, int(wait + load + 0.999))

    def _give_up(self, exit_code: int, reason: str) -> None:
        self.state = "failed"
        self._on_fatal(exit_code, reason)

    async def _serve(self, worker: WorkerProcess) -> WorkerDied:
        """Feed batches to the worker until it dies; return how it died."""
        assert worker.exited is not None
        while True:
            next_batch = asyncio.ensure_future(self.batcher.next_batch(self._batch_limit()))
            waiters: set[asyncio.Future[Any]] = {next_batch, worker.exited}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not next_batch.done():
                    next_batch.cancel()
                    await asyncio.wait({next_batch})
                if worker.exited.done() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    if next_batch.done() and not next_batch.cancelled():
                        self.batcher.requeue(next_batch.result())  # formed but never sent
            if worker.exited.done():
                return worker.exited.result()
            died = await self._run_batch(worker, next_batch.result())
            if died is not None:
                return died

    def _batch_limit(self) -> int:
        if self._oom_cap is not None:
            size, until = self._oom_cap
            if time.monotonic() < until:
                return size
            self._oom_cap = None
        return self.config.max_batch_size

    async def _run_batch(self, worker: WorkerProcess, jobs: list[Job]) -> WorkerDied | None:
        started_at = time.monotonic()
        for job in jobs:
            job.batch_size = len(jobs)
        batch = ipc.Batch(batch_id=next(_batch_ids), inputs=[job.input for job in jobs],
                          parameters=jobs[0].parameters,
                          request_ids=[job.request_id for job in jobs])
        try:
            result = await worker.run(batch, self.config.batch_timeout)
        except asyncio.CancelledError:  # the server stops before this batch finished
            self._fail(jobs, lambda: errors.Unavailable("the server is shutting down"))
            raise
        except WorkerDied as died:
            if not died.sent:  # it never ran: another worker (or this one restarted) can take it
                self.batcher.requeue(jobs)
                return died
            self._fail(jobs, lambda: errors.WorkerCrashed(retry_after=self.retry_after()))
            self._observe(jobs, started_at, None)
            return died
        except BatchTimeout:
            self.state = "restarting"  # killed; not serving while its exit is collected
            log.error("worker[%d] pid=%s: batch of %d ran past --batch-timeout %gs; killed it",
                      self.index, worker.pid, len(jobs), self.config.batch_timeout)
            self._fail(jobs, errors.BatchTimedOut)
            self._observe(jobs, started_at, None)
            return await asyncio.shield(worker.exited)  # type: ignore[arg-type]
        self.pipeline_calls += result.pipeline_calls
        for job, outcome in zip(jobs, result.outcomes):
            if isinstance(outcome, ipc.Ok):
                resolve(job, outcome.value)
            else:
                resolve(job, error=errors.error_for_kind(outcome.kind, outcome.message))
        self.batcher.finished(jobs, result.compute_seconds)
        self._observe(jobs, started_at, result.compute_seconds)
        if result.fits_batch_size is not None:
            self._oom_cap = (result.fits_batch_size, time.monotonic() + OOM_CAP_S)
            log.warning("worker[%d]: out of memory at batch size %d; capping batches to %d for %.0fs",
                        self.index, len(jobs), result.fits_batch_size, OOM_CAP_S)
        return None

    def _observe(self, jobs: list[Job], started_at: float, compute_seconds: float | None) -> None:
        if self._on_batch is not None:
            self._on_batch(jobs, started_at, compute_seconds)

    def _fail(self, jobs: list[Job], error_factory: Callable[[], BaseException]) -> None:
        for job in jobs:
            resolve(job, error=error_factory())
        self.batcher.finished(jobs, None)

    async def stop(self) -> None:
        """Stop restarting and shut the current worker down (after the batcher has drained)."""
        self._stopping = True
        self.state = "stopped"
        if self.worker is not None:
            await self.worker.stop()
