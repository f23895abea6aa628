"""Slow and idle clients: a bound on open connections and a deadline for a request's headers.

Every accepted connection goes through a `ConnectionGuard`, a thin protocol in front of
aiohttp's own. Beyond --max-connections it answers 503 at once and closes (so the accept loop
never meets EMFILE: the bound stays below the descriptor limit); a connection that has not sent
a whole request head within --header-timeout of opening is answered 408 and closed. Later
requests on a kept-alive connection are bounded by aiohttp's keep-alive timer
(--keepalive-timeout: it closes a connection that has not completed a request head since its
last response); bodies by --body-timeout where a handler reads them (api/common.read_body).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeserve.http")

# asyncio accepts up to `backlog` connections in one burst, and a refused connection's descriptor
# is closed two loop iterations later, after the next burst: so two bursts' worth stay free,
# plus room for what is not a client connection (the model processes' pipes, logs, files).
LISTEN_BACKLOG = 64
RESERVED_DESCRIPTORS = 2 * LISTEN_BACKLOG + 64
_HEAD_END = b"\r\n\r\n"


def _response(status: str, message: str, retry_after: bool) -> bytes:
    body = b'{"error": "' + message.encode() + b'"}'
    headers = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}",
               "Connection: close"]
    if retry_after:
        headers.append("Retry-After: 1")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


_REFUSED = _response("503 Service Unavailable", "server overloaded: too many open connections", True)
_HEAD_TIMED_OUT = _response("408 Request Timeout", "request headers not received in time", False)


def raise_descriptor_limit() -> int:
    """Raise the soft open-files limit to the hard one (as nginx's worker_rlimit_nofile); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.debug("could not raise the open-files limit from %d", soft)
    return soft


def connection_bound(configured: int, descriptor_limit: int) -> int:
    """--max-connections, lowered to what the descriptor limit leaves room for."""
    room = max(1, descriptor_limit - RESERVED_DESCRIPTORS)
    if configured > room:
        log.warning("--max-connections %d exceeds what %d open files allow; using %d (raise LimitNOFILE)",
                    configured, descriptor_limit, room)
    return min(configured, room)


@dataclass
class ConnectionStats:
    open: int = 0
    refused: int = 0  # beyond --max-connections
    head_timeouts: int = 0  # closed for not sending a request head within --header-timeout


class ConnectionGuard(asyncio.Protocol):
    """Admits a connection to aiohttp's protocol, or refuses it; enforces the head deadline."""

    def __init__(self, inner: Callable[[], Any], limit: int, header_timeout: float,
                 stats: ConnectionStats) -> None:
        self._make_inner = inner
        self._limit = limit
        self._header_timeout = header_timeout
        self._stats = stats
        self._inner: Any = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, so a head end split across reads is found

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._stats.open >= self._limit:
            self._stats.refused += 1
            transport.write(_REFUSED)
            transport.close()
            return
        self._stats.open += 1
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._header_timeout, self._head_timed_out)
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def _head_timed_out(self) -> None:
        self._timer = None
        self._stats.head_timeouts += 1
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_HEAD_TIMED_OUT)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            if _HEAD_END in self._tail + data:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = (self._tail + data)[-3:]
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._stats.open -= 1
            self._inner.connection_lost(exc)
            self._inner = None


async def listen(inner: Callable[[], Any], sockets: list[socket.socket] | None, host: str, port: int,
                 limit: int, header_timeout: float, stats: ConnectionStats) -> list[asyncio.Server]:
    """Serve `inner` (aiohttp's protocol factory) behind the guard on the passed sockets, or host:port."""
    loop = asyncio.get_running_loop()

    def factory() -> ConnectionGuard:
        return ConnectionGuard(inner, limit, header_timeout, stats)

    if sockets:
        return [await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG) for sock in sockets]
    return [await loop.create_server(factory, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)]
