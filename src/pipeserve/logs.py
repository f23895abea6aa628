"""Logging for both processes: plain lines or JSON, stamped unless the journal stamps them."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOG_FORMATS = ("text", "json")
# Attributes every LogRecord has; anything else was passed in `extra=` and goes into JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, and any `extra=`."""

    def __init__(self, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {}
        if self.stamp:
            entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
                f".{int(record.msecs):03d}Z"
        entry.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage(),
                     pid=record.process)
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def under_journal() -> bool:
    """Running under systemd with stderr connected to the journal, which stamps each line."""
    return bool(os.environ.get("JOURNAL_STREAM"))


def configure(level: str, fmt: str = "text", prefix: str = "") -> None:
    """Send every log record to stderr in the chosen format; `prefix` names the process."""
    stamp = not under_journal()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(stamp=stamp))
    else:
        time_part = "%(asctime)s " if stamp else ""
        handler.setFormatter(logging.Formatter(f"{time_part}%(levelname)s {prefix}%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
