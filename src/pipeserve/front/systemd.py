"""systemd integration without libsystemd: sd_notify datagrams and socket activation.

`Notifier` writes `READY=1`, `STATUS=…`, `EXTEND_TIMEOUT_USEC=…`, `WATCHDOG=1` and
`STOPPING=1` to `$NOTIFY_SOCKET` (a path, or an abstract socket written `@name`); without the
variable every call does nothing. `listen_sockets` takes the sockets systemd passed
(`LISTEN_FDS`, `LISTEN_PID`), as sd_listen_fds(3) does.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("pipeserve.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        if address:
            # An abstract socket's name starts with a NUL byte, written '@' in the variable.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: object) -> None:
        """Send `KEY=value` lines, e.g. notify(READY=1, STATUS="serving")."""
        if self._socket is None or self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:  # never let the service manager's socket take the server down
            log.debug("sd_notify failed: %s", exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), if the watchdog is for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1_000_000
    except ValueError:
        return None


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed us (socket activation), or none.

    The variables are removed so that the model processes do not think the sockets are theirs.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if not count or pid != str(os.getpid()):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
