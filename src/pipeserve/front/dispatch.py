"""Batch dispatch for one worker slot: take a batch when the worker is idle, run it, resolve jobs.

The `Dispatcher` feeds one live `WorkerProcess` until it dies: it asks the batcher for the next
batch only when the worker is idle, sends it, and settles each job from the outcome the model
process reports. When the worker dies mid-batch it fails exactly that batch; a batch that was
formed but never reached the process goes back to the head of the queue. Restart policy lives
in supervisor.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeserve import ipc
from pipeserve.front import errors
from pipeserve.front.batcher import Batcher, Job, resolve
from pipeserve.front.worker import BatchTimeout, WorkerDied, WorkerProcess

log = logging.getLogger("pipeserve.supervisor")

OOM_CAP_S = 60.0  # how long batches stay capped to the size that fit after an out-of-memory
_batch_ids = itertools.count(1)
# Called after each batch: (its jobs, when it was sent, compute seconds or None if it failed).
BatchObserver = Callable[[list[Job], float, "float | None"], None]


class Dispatcher:
    """Runs the batcher's batches on one slot's worker, one at a time."""

    def __init__(self, index: int, batcher: Batcher, max_batch_size: int, batch_timeout: float,
                 retry_after: Callable[[], int], on_batch: BatchObserver | None = None) -> None:
        self.index = index
        self.batcher = batcher
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self._retry_after = retry_after
        self._on_batch = on_batch
        self._oom_cap: tuple[int, float] | None = None  # (size, until)
        self.pipeline_calls = 0
        self.completed = 0  # batches the current worker completed (its outcomes came back)

    async def serve(self, worker: WorkerProcess, on_kill: Callable[[], None]) -> WorkerDied:
        """Feed batches to the worker until it dies; return how it died.

        `on_kill` is called when a batch overruns its timeout and the worker is killed for it.
        """
        assert worker.exited is not None
        self.completed = 0
        while True:
            errors.raise_if_cancelled()
            if not worker.takes_new_work():  # past --max-worker-memory: it is retired when idle
                return await asyncio.shield(worker.exited)
            next_batch = asyncio.ensure_future(self.batcher.next_batch(self._batch_limit()))
            waiters: set[asyncio.Future[Any]] = {next_batch, worker.exited}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not next_batch.done():
                    next_batch.cancel()
                    await asyncio.wait({next_batch})
                current = asyncio.current_task()
                stopping = current is not None and current.cancelling() > 0
                if (worker.exited.done() or stopping) and next_batch.done() and not next_batch.cancelled():
                    self.batcher.requeue(next_batch.result())  # formed but never sent
            if worker.exited.done():
                return worker.exited.result()
            if not worker.takes_new_work():  # became so while the batch formed: it may be retired already
                self.batcher.requeue(next_batch.result())
                return await asyncio.shield(worker.exited)
            died = await self._run(worker, next_batch.result(), on_kill)
            if died is not None:
                return died

    def _batch_limit(self) -> int:
        if self._oom_cap is not None:
            size, until = self._oom_cap
            if time.monotonic() < until:
                return size
            self._oom_cap = None
        return self.max_batch_size

    async def _run(self, worker: WorkerProcess, jobs: list[Job],
                   on_kill: Callable[[], None]) -> WorkerDied | None:
        started_at = time.monotonic()
        for job in jobs:
            job.batch_size = len(jobs)
        batch = ipc.Batch(batch_id=next(_batch_ids), inputs=[job.input for job in jobs],
                          parameters=jobs[0].parameters,
                          request_ids=[job.request_id for job in jobs], op=jobs[0].op)
        try:
            result = await worker.run(batch, self.batch_timeout)
        except asyncio.CancelledError:  # the server stops before this batch finished
            self._fail(jobs, lambda: errors.Unavailable("the server is shutting down", retry_after=1))
            raise
        except WorkerDied as died:
            if not died.sent:  # it never ran: another worker (or this one restarted) can take it
                self.batcher.requeue(jobs)
                return died
            self._fail(jobs, lambda: errors.WorkerCrashed(retry_after=self._retry_after()))
            self._observe(jobs, started_at, None)
            return died
        except BatchTimeout:
            on_kill()
            log.error("worker[%d] pid=%s: batch of %d ran past --batch-timeout %gs; killed it",
                      self.index, worker.pid, len(jobs), self.batch_timeout)
            self._fail(jobs, errors.BatchTimedOut)
            self._observe(jobs, started_at, None)
            assert worker.exited is not None
            return await asyncio.shield(worker.exited)
        self._settle(jobs, result)
        self.completed += 1
        self._observe(jobs, started_at, result.compute_seconds)
        return None

    def _settle(self, jobs: list[Job], result: ipc.BatchResult) -> None:
        self.pipeline_calls += result.pipeline_calls
        for job, outcome in zip(jobs, result.outcomes, strict=True):
            if isinstance(outcome, ipc.Ok):
                job.token_count = outcome.tokens
                resolve(job, outcome.value)
            else:
                resolve(job, error=errors.error_for_kind(outcome.kind, outcome.message))
        self.batcher.finished(jobs, result.compute_seconds)
        if result.fits_batch_size is not None:
            self._oom_cap = (result.fits_batch_size, time.monotonic() + OOM_CAP_S)
            log.warning("worker[%d]: out of memory at batch size %d; capping batches to %d for %.0fs",
                        self.index, len(jobs), result.fits_batch_size, OOM_CAP_S)

    def _observe(self, jobs: list[Job], started_at: float, compute_seconds: float | None) -> None:
        if self._on_batch is not None:
            self._on_batch(jobs, started_at, compute_seconds)

    def _fail(self, jobs: list[Job], error_factory: Callable[[], BaseException]) -> None:
        for job in jobs:
            resolve(job, error=error_factory())
        self.batcher.finished(jobs, None)
