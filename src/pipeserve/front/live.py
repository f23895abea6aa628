"""Live figures for the page (`GET /stats`): totals, gauges and the recent latency tails.

Every answered request and every first token of a stream is appended to a bounded deque as it
happens (one append, no arithmetic); quantiles are computed only when /stats is asked, over the
last RECENT_S seconds. Rates (requests/s, tokens/s) are the client's: the difference of two
totals over the time between two polls, so a page that polls every second or every five gets
what it asks for, and a server nobody watches does no summarising at all.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

RECENT_S = 10.0  # the latency quantiles cover this many seconds of answered requests
_MOST_KEPT = 50_000  # a bound on memory whatever the request rate (far beyond this CPU's)


class Recent:
    """Requests and first tokens of the last few seconds, and totals since start."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._latencies: deque[tuple[float, float]] = deque(maxlen=_MOST_KEPT)
        self._first_tokens: deque[tuple[float, float]] = deque(maxlen=_MOST_KEPT)
        self.requests = 0
        self.client_errors = 0  # 4xx: the request was refused as sent
        self.server_errors = 0  # 5xx: overloaded, crashed, failed, timed out

    def request(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.server_errors += 1
        elif status >= 400:
            self.client_errors += 1
        self._latencies.append((self._clock(), seconds))

    def first_token(self, seconds: float) -> None:
        self._first_tokens.append((self._clock(), seconds))

    def summary(self) -> dict[str, Any]:
        """Totals and the last RECENT_S seconds' latency and time-to-first-token quantiles (ms)."""
        since = self._clock() - RECENT_S
        return {
            "requests": self.requests, "client_errors": self.client_errors,
            "server_errors": self.server_errors,
            "latency_ms": _quantiles(self._latencies, since),
            "time_to_first_token_ms": _quantiles(self._first_tokens, since),
            "window_seconds": RECENT_S,
        }


def _quantiles(samples: deque[tuple[float, float]], since: float) -> dict[str, float | int | None]:
    recent = sorted(seconds for at, seconds in samples if at >= since)
    if not recent:
        return {"count": 0, "p50": None, "p99": None}

    def at(q: float) -> float:
        return round(recent[min(len(recent) - 1, int(q * len(recent)))] * 1000, 3)

    return {"count": len(recent), "p50": at(0.5), "p99": at(0.99)}
