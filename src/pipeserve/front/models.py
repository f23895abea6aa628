"""The models one server serves: each its own Runtime (model processes, queue, admission,
deadlines, streams), found by name, started, drained and stopped together.

Isolation follows from the split: a model's crash, crash loop, overload or slow load touches
only its own Runtime. A model that cannot load is reported (its requests answer 503 saying
why, /ready and /info name it) while the others serve; only when it is the server's one model
does the server exit, as it always has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.connections import ConnectionStats
from pipeserve.front.deployment import Deployment
from pipeserve.front.metrics import Metrics
from pipeserve.front.runtime import Runtime
from pipeserve.ipc import ExitCode

log = logging.getLogger("pipeserve")


class Models:
    def __init__(self, deployment: Deployment, entry_point: str | None = None,
                 worker_allocator: str = "glibc") -> None:
        self.config = deployment.config  # the server's own settings (host, port, key, limits)
        self.metrics = Metrics()
        self.changed = asyncio.Event()  # a worker of any model changed state, or a stop began
        self.connections = ConnectionStats()
        self.stop_requested = asyncio.Event()
        self.stop_signal: str | None = None
        self.exit_code = ExitCode.OK
        self.draining = False
        self.failed: dict[str, str] = {}  # models that could not load, and why
        self._cut_short = asyncio.Event()
        extra = {"entry_point": entry_point} if entry_point else {}
        several = len(deployment.models) > 1  # then each model's log lines name it
        self.runtimes: dict[str, Runtime] = {
            entry.name: Runtime(entry.config, worker_allocator=worker_allocator, name=entry.name,
                                metrics=self.metrics, changed=self.changed, on_give_up=self._give_up,
                                log_name=entry.name if several else "", **extra)
            for entry in deployment.models}
        self.first = next(iter(self.runtimes.values()))

    def __iter__(self) -> Iterator[Runtime]:
        return iter(self.runtimes.values())

    def __len__(self) -> int:
        return len(self.runtimes)

    # --- finding a request's model ------------------------------------------------------------------

    def named(self, name: str) -> Runtime:
        """The model served under `name`, or a 404 that lists them."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise errors.NotFound(f"model {name!r} is not served here; this server serves "
                                  f"{', '.join(repr(known) for known in self.runtimes)}", code="model_not_found")
        return runtime

    def by_field(self, name: str | None) -> Runtime:
        """An OpenAI request's model by its `model` field: with one model served, any name is it
        (as before there were several); with several, the one named (the first when unnamed)."""
        if len(self.runtimes) == 1 or name is None:
            return self.first
        return self.named(name)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        for runtime in self:
            runtime.start()

    def request_stop(self, signal_name: str) -> None:
        """Signal handler: only record; the main coroutine acts on it."""
        if self.stop_requested.is_set():
            self._cut_short.set()
        self.stop_signal = signal_name
        self.stop_requested.set()
        self.changed.set()

    def _give_up(self, runtime: Runtime, exit_code: ExitCode, reason: str) -> None:
        """A model cannot be served (load failed or timed out, crash loop): the server stops if
        it was the only one; otherwise that model is reported and the others go on."""
        log.error("%s", reason)
        if len(self.runtimes) > 1:
            if runtime.name not in self.failed:
                self.failed[runtime.name] = reason
                runtime.failed = reason
                asyncio.get_running_loop().create_task(runtime.stop(), name=f"stop-{runtime.name}")
            self.changed.set()
            return
        if self.exit_code == ExitCode.OK:
            self.exit_code = exit_code
        self.stop_requested.set()
        self.changed.set()

    async def drain(self) -> bool:
        """Every model drains at once, each within --drain-timeout; False if any was cut short."""
        self.draining = True
        done = await asyncio.gather(*(runtime.drain(self._cut_short) for runtime in self))
        return all(done)

    async def stop(self) -> None:
        self.draining = True
        await asyncio.gather(*(runtime.stop() for runtime in self), return_exceptions=True)

    # --- state for the HTTP layer and systemd ----------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """Why /ready is 503: draining, or a model (not one that failed for good) not serving."""
        if self.draining:
            return "draining"
        reasons = [runtime.unavailable_reason() for runtime in self if runtime.name not in self.failed]
        if not reasons:
            return "failed"
        return next((reason for reason in reasons if reason is not None), None)

    def readiness(self) -> dict[str, Any]:
        """Each model's status, for /ready's body."""
        return {runtime.name: self.failed.get(runtime.name) or runtime.unavailable_reason() or "ready"
                for runtime in self}

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        if len(self.runtimes) == 1:
            return self.first.status_line()
        return "; ".join(f"{runtime.name}: {status}" for runtime, status in
                         ((runtime, (self.failed.get(runtime.name) and "failed") or runtime.status_line())
                          for runtime in self))


MODELS = web.AppKey("models", Models)
