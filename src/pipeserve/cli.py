"""The command line: parse settings, set up logging, run the front until stopped."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from pipeserve import errors
from pipeserve.config import Config, load_config
from pipeserve.http import create_app
from pipeserve.runtime import Runtime

log = logging.getLogger("pipeserve")

# aiohttp waits this long for open connections once the listener closes; by then the jobs
# have drained, so only idle keep-alive connections remain.
_CONNECTION_CLOSE_TIMEOUT_S = 2.0


def configure_logging(level: str) -> None:
    # Under systemd the journal stamps each line itself.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"{stamp}%(levelname)s %(name)s %(message)s")
    if level != "debug":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(config: Config) -> int:
    """Run the server until a signal or a fatal worker failure; return the exit code."""
    loop = asyncio.get_running_loop()
    runtime = Runtime(config)
    runner = web.AppRunner(create_app(runtime), handler_cancellation=True,
                           shutdown_timeout=_CONNECTION_CLOSE_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
        await runner.cleanup()
        return errors.EXIT_CRASH_LOOP
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info("listening on http://%s:%d (front pid=%d)", host if ":" not in host else f"[{host}]",
                 port, os.getpid())
    if not config.required_api_key() and not _is_loopback(config.host):
        log.warning("listening on %s without --api-key: anyone who can reach it can use the model",
                    config.host)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop, sig.name)
    runtime.start()
    await runtime.stop_requested.wait()
    if runtime.stop_signal:
        log.info("%s received: shutting down", runtime.stop_signal)
    if runtime.exit_code == errors.EXIT_OK:
        await runtime.drain()
    await runtime.stop()
    await runner.cleanup()
    log.info("stopped (exit code %d)", runtime.exit_code)
    return runtime.exit_code


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    configure_logging(config.log_level)
    return asyncio.run(serve(config))
