"""The command line: parse settings, set up logging, run the front until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from pipeserve import logs
from pipeserve.front import allocator, connections, early, init, systemd
from pipeserve.front.config import ConfigError
from pipeserve.front.deployment import Deployment, load_deployment
from pipeserve.front.models import Models
from pipeserve.http import create_app
from pipeserve.ipc import ExitCode

log = logging.getLogger("pipeserve")

# aiohttp waits this long for open connections once the listener closes; by then the jobs
# have drained, so only idle keep-alive connections remain.
_CONNECTION_CLOSE_TIMEOUT_S = 2.0
_STATUS_REFRESH_S = 5.0  # how often STATUS= is refreshed while nothing changes
_LOAD_EXTENSION_S = 30.0  # EXTEND_TIMEOUT_USEC granted at a time while the model loads
_GIVE_UP_GRACE_S = 10.0  # after --load-timeout: killing the worker and exiting


async def serve(deployment: Deployment, worker_allocator: str = "glibc",
                reread: Callable[[], Deployment] | None = None) -> int:
    """Run the server until a signal or a fatal worker failure; return the exit code. SIGHUP
    rereads the models (`reread`) and reloads them (front/models.Models.reload)."""
    loop = asyncio.get_running_loop()
    config = deployment.config
    runtime = Models(deployment, worker_allocator=worker_allocator)
    for model in runtime:
        log.info("model %r: %s", model.name, model.model or model.config.pipeline)
    notifier = systemd.Notifier()
    runner = web.AppRunner(create_app(runtime), handler_cancellation=True, access_log=None,
                           shutdown_timeout=_CONNECTION_CLOSE_TIMEOUT_S,
                           keepalive_timeout=config.keepalive_timeout)
    await runner.setup()
    try:
        servers = await _listen(runner, runtime)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        await runner.cleanup()
        return ExitCode.CRASH_LOOP
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop, sig.name)
    if init.is_init():  # a container's PID 1: orphans in the namespace become our children
        loop.add_signal_handler(signal.SIGCHLD, init.reap_orphans)
    if early.received:  # a SIGTERM that came while we were starting: no model process to start
        runtime.request_stop(early.received)
    else:
        runtime.start()
    notifications = asyncio.create_task(_notify_systemd(runtime, notifier))
    reloads = asyncio.create_task(_reload_on_sighup(runtime, reread or (lambda: deployment)))
    await runtime.stop_requested.wait()
    if runtime.stop_signal:
        log.info("%s received: shutting down", runtime.stop_signal)
    notifier.notify(STOPPING=1, STATUS="draining")
    if runtime.exit_code == ExitCode.OK:
        await runtime.drain()
    await runtime.stop()
    notifications.cancel()
    reloads.cancel()
    for server in servers:
        server.close()
    await runner.cleanup()
    notifier.close()
    log.info("stopped (exit code %d)", runtime.exit_code)
    return int(runtime.exit_code)


async def _listen(runner: web.AppRunner, runtime: Models) -> list[asyncio.Server]:
    """Serve on the sockets systemd passed (socket activation), or bind --host:--port; every
    connection behind the guard (connections.py)."""
    config = runtime.config
    passed = systemd.listen_sockets()
    limit = connections.connection_bound(config.max_connections, connections.raise_descriptor_limit())
    assert runner.server is not None
    servers = await connections.listen(runner.server, passed, config.host, config.port, limit,
                                       config.header_timeout, runtime.connections)
    addresses = [sock.getsockname() for server in servers for sock in server.sockets]
    for address in addresses:
        if isinstance(address, (str, bytes)):  # a unix socket passed by systemd
            log.info("listening on unix:%s (front pid=%d)", address, os.getpid())
        else:
            host = address[0] if ":" not in address[0] else f"[{address[0]}]"
            log.info("listening on http://%s:%d (front pid=%d)", host, address[1], os.getpid())
    if not passed and not config.required_api_key() and not _is_loopback(config.host):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model",
                    config.host or "every address")
    return servers


async def _notify_systemd(runtime: Models, notifier: systemd.Notifier) -> None:
    """READY=1 once the model serves; STATUS= on every change; EXTEND_TIMEOUT_USEC while the
    model loads; WATCHDOG=1 at half the watchdog interval while the loop runs and the workers
    are alive or being restarted within budget."""
    if not notifier.enabled:
        return
    watchdog = systemd.watchdog_interval()
    tick = min(_STATUS_REFRESH_S, watchdog) if watchdog else _STATUS_REFRESH_S
    ready_sent = False
    last_status = ""
    # Never ask systemd to wait for the load past --load-timeout (plus the time to give up).
    load_deadline = time.monotonic() + max(model.config.load_timeout for model in runtime) + _GIVE_UP_GRACE_S
    while True:
        reason = runtime.unavailable_reason()
        fields: dict[str, object] = {}
        status = runtime.status_line()
        if status != last_status:
            fields["STATUS"] = last_status = status
        if reason is None and not ready_sent:
            fields["READY"] = 1
            ready_sent = True
        elif reason == "loading" and not ready_sent:
            extension = min(max(_LOAD_EXTENSION_S, 2 * tick), load_deadline - time.monotonic())
            if extension > 0:
                fields["EXTEND_TIMEOUT_USEC"] = int(extension * 1_000_000)
        if watchdog and runtime.exit_code == ExitCode.OK:
            fields["WATCHDOG"] = 1
        if fields:
            notifier.notify(**fields)
        runtime.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.changed.wait(), tick)


async def _reload_on_sighup(models: Models, reread: Callable[[], Deployment]) -> None:
    """SIGHUP (recorded by its handler; acted on here): reread the models, reload them. A
    declaration that does not parse is logged, and the models serve on as they were."""
    requested = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, requested.set)
    while True:
        await requested.wait()
        requested.clear()
        log.info("SIGHUP received: rereading the models")
        try:
            deployment = reread()
        except (ConfigError, SystemExit) as exc:
            log.error("SIGHUP: the models did not parse (%s); serving them as they were", exc)
            continue
        try:
            await models.reload(deployment)
        except Exception:  # a fault in one reload must not end the reloads after it
            log.exception("SIGHUP: the reload failed; a later SIGHUP is still read")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    early.install()  # again, for the console script (python -m pipeserve did it on its first line)
    try:
        deployment = load_deployment(argv)
    except ConfigError as exc:
        print(f"pipeserve: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    config = deployment.config
    logs.configure(config.log_level, config.log_format)
    try:  # before any model process is spawned: they inherit the environment
        worker_allocator = allocator.prepare(config.allocator, os.environ)
    except allocator.AllocatorNotFound as exc:
        log.error("%s", exc)
        return ExitCode.USAGE
    log.info("model processes' allocator: %s", worker_allocator)
    return asyncio.run(serve(deployment, worker_allocator, reread=lambda: load_deployment(argv)))
