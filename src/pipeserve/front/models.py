"""The models one server serves: each its own Runtime (model processes, queue, admission,
deadlines, streams), found by name, started, drained and stopped together.

Isolation follows from the split: a model's crash, crash loop, overload or slow load touches
only its own Runtime. A model that cannot load is reported (its requests answer 503 saying
why, /ready and /info name it) while the others serve; only when it is the server's one model
does the server exit, as it always has.

More models than memory: with --max-loaded-models N only N are loaded at once; a request for
another waits while it loads, and the least recently used idle model is unloaded to make room
(a model with work under way never is). --keep-alive unloads a model idle that long. SIGHUP
rereads the declarations (`reload`): a new model is started, a removed one drained and stopped,
a changed one replaced once its new processes serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.connections import ConnectionStats
from pipeserve.front.deployment import Deployment, ModelEntry
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
        self.max_loaded = self.config.max_loaded_models or len(deployment.models)
        self._cut_short = asyncio.Event()
        self._lock = asyncio.Lock()  # one load, unload or reload decision at a time
        self._extra = {"entry_point": entry_point} if entry_point else {}
        self._allocator = worker_allocator
        self._tasks: list[asyncio.Task[None]] = []
        self._keep_alive_timer: asyncio.Task[None] | None = None
        self.runtimes: dict[str, Runtime] = {}
        for index, entry in enumerate(deployment.models):
            runtime = self.runtimes[entry.name] = self._runtime(entry, several=len(deployment.models) > 1)
            runtime.loaded = index < self.max_loaded  # the first N are loaded at start
        self.first = next(iter(self.runtimes.values()))

    def _runtime(self, entry: ModelEntry, several: bool) -> Runtime:
        return Runtime(entry.config, worker_allocator=self._allocator, name=entry.name, metrics=self.metrics,
                       changed=self.changed, on_give_up=self._give_up, log_name=entry.name if several else "",
                       **self._extra)

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
        self._time_keep_alive()

    def _time_keep_alive(self) -> None:
        """Run the --keep-alive timer once any model has one, declared at start or by a reload."""
        if self._keep_alive_timer is None and any(runtime.config.keep_alive is not None for runtime in self):
            self._keep_alive_timer = asyncio.create_task(self._keep_alive(), name="keep-alive")
            self._tasks.append(self._keep_alive_timer)

    # --- loading on demand ----------------------------------------------------------------------------

    async def hold(self, runtime: Runtime, deadline: float) -> None:
        """A request chose `runtime`: it is not unloaded until `release`; if it is not loaded, it is
        loaded now (room made by unloading the least recently used idle model), and the request
        waits while it loads, within its deadline."""
        runtime.holders += 1
        runtime.unheld.clear()
        runtime.last_used = time.monotonic()
        if runtime.loaded and not runtime.demanded:
            return
        if not runtime.loaded:
            await self._lock_within(deadline, runtime)
            try:
                if not runtime.loaded and runtime.failed is None and not self.draining:
                    await self._make_room(runtime)
                    log.info("loading model %r: a request asked for it", runtime.name)
                    self.metrics.model_loads.labels(runtime.name, "request").inc()
                    runtime.demanded = True
                    runtime.load()
            finally:
                self._lock.release()
        try:
            await runtime.until_serving(deadline)
        finally:
            if runtime.unavailable_reason() is None:
                runtime.demanded = False

    async def _lock_within(self, deadline: float, runtime: Runtime) -> None:
        """The models' lock, or a 504 at the request's deadline: a reload holds the lock while a
        replacement loads (up to --load-timeout), and a request must not wait past its own."""
        try:
            await asyncio.wait_for(self._lock.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise runtime.late() from None
        if time.monotonic() >= deadline and not runtime.loaded:  # no model unloaded for a request past it
            self._lock.release()
            raise runtime.late()

    def release(self, runtime: Runtime) -> None:
        runtime.holders -= 1
        runtime.last_used = time.monotonic()
        if not runtime.holders:
            runtime.unheld.set()

    async def _make_room(self, wanted: Runtime) -> None:
        loaded = [runtime for runtime in self if runtime.loaded and runtime is not wanted and runtime.failed is None]
        if len(loaded) < self.max_loaded:
            return
        idle = [runtime for runtime in loaded if not runtime.busy]
        if not idle:
            raise errors.Overloaded(f"model {wanted.name!r} is not loaded, and each of the {self.max_loaded} loaded "
                                    "models (--max-loaded-models) has work under way", retry_after=2)
        victim = min(idle, key=lambda runtime: runtime.last_used)
        await self._unload(victim, "lru", f"the least recently used, to make room for {wanted.name!r}")

    async def _unload(self, runtime: Runtime, reason: str, why: str) -> None:
        log.info("unloading model %r: %s", runtime.name, why)
        self.metrics.model_unloads.labels(runtime.name, reason).inc()
        await runtime.unload()

    async def _keep_alive(self) -> None:
        """Unload each model idle longer than its --keep-alive (checked every second)."""
        while True:
            await asyncio.sleep(1.0)  # a timer, not a synchronisation: idleness has no event
            for runtime in list(self):
                if not self._idle_past_keep_alive(runtime):
                    continue
                async with self._lock:
                    # Asked again: while this waited for the lock (a reload holds it through a load), a
                    # request may have used the model, or a reload changed its keep_alive.
                    if self._idle_past_keep_alive(runtime):
                        await self._unload(runtime, "keep_alive", f"idle for {self._idle_for(runtime):.0f}s "
                                           f"(--keep-alive {runtime.config.keep_alive:g}s)")

    @staticmethod
    def _idle_for(runtime: Runtime) -> float:
        return time.monotonic() - runtime.last_used

    def _idle_past_keep_alive(self, runtime: Runtime) -> bool:
        keep = runtime.config.keep_alive
        return keep is not None and runtime.loaded and not runtime.busy and self._idle_for(runtime) >= keep

    def request_stop(self, signal_name: str) -> None:
        """Signal handler: only record; the main coroutine acts on it."""
        if self.stop_requested.is_set():
            self._cut_short.set()
        self.stop_signal = signal_name
        self.stop_requested.set()
        self.changed.set()

    def _give_up(self, runtime: Runtime, exit_code: ExitCode, reason: str) -> None:
        """A model cannot be served (load failed or timed out, crash loop): the server stops if
        it was the only one; otherwise that model is reported and the others go on. A reload's
        replacement not yet swapped in only says so: the reload keeps the model it replaces."""
        log.error("%s", reason)
        if self.runtimes.get(runtime.name) is not runtime:
            runtime.failed = runtime.failed or reason  # until_serving raises it to the reload
            return
        if len(self.runtimes) > 1:
            if runtime.failed is None:
                runtime.failed = reason
                self._tasks.append(asyncio.get_running_loop().create_task(runtime.stop(), name=f"stop-{runtime.name}"))
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(runtime.stop() for runtime in self), return_exceptions=True)

    # --- reloading (SIGHUP) -------------------------------------------------------------------------

    async def reload(self, deployment: Deployment) -> None:
        """Serve `deployment`'s models: start the new, replace the changed once their new
        processes serve (the old one keeps serving until then, and drains after), drain and stop
        the removed. A replacement that cannot load leaves the old one serving."""
        async with self._lock:
            several = len(deployment.models) > 1
            started: dict[str, Runtime] = {}
            for entry in deployment.models:
                current = self.runtimes.get(entry.name)
                if current is not None and current.config == entry.config and current.failed is None:
                    continue
                runtime = started[entry.name] = self._runtime(entry, several)
                # Loaded where the one it replaces was, or where there is room for one more.
                runtime.loaded = (current.loaded if current is not None
                                  else sum(r.loaded for r in self) + len(started) <= self.max_loaded)
                runtime.start()
            for name, runtime in list(started.items()):
                if name in self.runtimes and runtime.loaded:
                    try:
                        await runtime.until_serving(time.monotonic() + runtime.config.load_timeout)
                    except errors.PipeserveError as exc:
                        log.error("reload: model %r's new settings do not serve (%s); the old ones stay", name,
                                  exc.message)
                        await runtime.stop()
                        self.runtimes[name].bind_metrics()
                        del started[name]
            names = [entry.name for entry in deployment.models]
            retired = [runtime for name, runtime in self.runtimes.items() if name not in names or name in started]
            self.runtimes = {name: started.get(name) or self.runtimes[name] for name in names}
            self.first = next(iter(self.runtimes.values()))
            self._time_keep_alive()
        for name in started:
            log.info("reload: model %r %s", name, "replaced" if any(r.name == name for r in retired) else "added")
            self.metrics.model_loads.labels(name, "reload").inc()
        for runtime in retired:
            removed = runtime.name not in self.runtimes
            log.info("reload: model %r %s; draining it", runtime.name, "removed" if removed else "replaced")
            self.metrics.model_unloads.labels(runtime.name, "reload").inc()
            self._tasks.append(asyncio.create_task(self._retire(runtime, removed), name=f"retire-{runtime.name}"))
        self.changed.set()

    async def _retire(self, runtime: Runtime, removed: bool) -> None:
        # The requests that chose it before the swap finish on it (within --drain-timeout) before
        # its doors close: none of them is refused.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.unheld.wait(), runtime.config.drain_timeout)
        await runtime.drain()
        await runtime.stop()
        if removed and runtime.name not in self.runtimes:
            self.metrics.unbind(runtime.name)

    # --- state for the HTTP layer and systemd ----------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """Why /ready is 503: draining, or a model (not one that failed for good) not serving."""
        if self.draining:
            return "draining"
        reasons = [runtime.unavailable_reason() for runtime in self if runtime.failed is None]
        if not reasons:
            return "failed"
        # A model unloaded on purpose (--max-loaded-models, --keep-alive) loads on its next request.
        return next((reason for reason in reasons if reason not in (None, "unloaded")), None)

    def readiness(self) -> dict[str, Any]:
        """Each model's status, for /ready's body."""
        return {runtime.name: runtime.failed or runtime.unavailable_reason() or "ready" for runtime in self}

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        if len(self.runtimes) == 1:
            return self.first.status_line()
        return "; ".join(f"{runtime.name}: {'failed' if runtime.failed else runtime.status_line()}"
                         for runtime in self)


MODELS = web.AppKey("models", Models)
