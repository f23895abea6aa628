"""SIGTERM recorded from the process's first line until the event loop's own handler takes over.

A container's PID 1 gets no default action for SIGTERM: one that arrives while the front is
still importing would be dropped, and `docker stop` would wait for its SIGKILL. `__main__`
installs this before importing anything else; it imports only `signal`.
"""

from __future__ import annotations

import signal
from types import FrameType

received: str | None = None  # the name of the signal that came before the loop's handlers


def _record(signum: int, _frame: FrameType | None) -> None:
    global received  # noqa: PLW0603 - a signal handler has nowhere else to put it
    received = signal.Signals(signum).name


def install() -> None:
    signal.signal(signal.SIGTERM, _record)
