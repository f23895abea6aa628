"""The pipe protocol between the front and a model process: every message type, in one place.

The set is closed: the front sends `Batch` and `Shutdown`; the model process sends `Ready`
(after loading and warming up), `BatchResult` (one per `Batch`) and `Fatal` (when it cannot load).
Errors cross as data (kind + safe message), never as pickled exceptions, and outputs cross as
plain Python and numpy values: unpickling them in the front must never import torch.

Frames use the wire format of `multiprocess.connection.Connection.send_bytes` (a 4-byte
big-endian signed length, or -1 and an 8-byte length for frames over 2 GiB), so the model
process uses a plain blocking Connection while the front reads and writes the same socket with
asyncio streams and never blocks its event loop.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, Union

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What a model process is started with (passed as the spawn argument, not over the pipe)."""

    model: str
    task: str | None
    pipeline: str | None
    device: str
    dtype: str
    threads: int
    max_worker_memory: int | None
    log_level: str
    log_format: str = "text"
    worker_index: int = 0
    # With --devices cuda:N: CUDA_VISIBLE_DEVICES for this worker, which then uses cuda:0.
    visible_devices: str | None = None


@dataclass(frozen=True)
class Ready:
    """The pipeline is loaded and a warm-up inference ran: the worker can take batches."""

    protocol_version: int
    pid: int
    model: str
    task: str
    device: str
    dtype: str
    load_seconds: float
    versions: dict[str, str]
    # Keyword parameters the pipeline accepts; None when it takes arbitrary keywords.
    accepted_parameters: tuple[str, ...] | None
    input_kind: str = "text"  # text: str inputs; image/audio: bytes of an encoded file


@dataclass(frozen=True)
class Batch:
    """One pipeline call: all inputs share the same parameters."""

    batch_id: int
    inputs: list[Any]
    parameters: dict[str, Any]
    request_ids: list[str] = field(default_factory=list)  # for the model process's log lines


@dataclass(frozen=True)
class Ok:
    value: Any


@dataclass(frozen=True)
class Failed:
    kind: str  # one of errors.KIND_*
    message: str  # safe to show to a client


Outcome = Union[Ok, Failed]


@dataclass(frozen=True)
class BatchResult:
    """One outcome per input of the Batch with the same id, in order."""

    batch_id: int
    outcomes: list[Outcome]
    compute_seconds: float
    pipeline_calls: int
    # Set after an out-of-memory: the largest batch size that ran; the front caps batches to it.
    fits_batch_size: int | None = None
    rss_bytes: int = 0


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more and exit 0."""


@dataclass(frozen=True)
class Fatal:
    """The worker cannot serve (the model did not load); it exits right after sending this."""

    reason: str  # one line, safe to log and show
    detail: str = field(default="", repr=False)  # the traceback, for --log-level debug


ToWorker = Union[Batch, Shutdown]
FromWorker = Union[Ready, BatchResult, Fatal]
_MESSAGE_TYPES = (WorkerSpec, Ready, Batch, BatchResult, Shutdown, Fatal)


class ProtocolError(Exception):
    """A frame that is not one of this module's messages."""


def encode(message: Any) -> bytes:
    if not isinstance(message, _MESSAGE_TYPES):
        raise ProtocolError(f"not a protocol message: {type(message).__name__}")
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(frame: bytes) -> Any:
    message = pickle.loads(frame)
    if not isinstance(message, _MESSAGE_TYPES):
        raise ProtocolError(f"unexpected message type {type(message).__name__}")
    return message


# --- asyncio side of the framing (the front) ---------------------------------------------------

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


async def read_message(reader: asyncio.StreamReader) -> Any:
    """Read one frame written by Connection.send_bytes; raises IncompleteReadError on EOF."""
    (size,) = _SHORT.unpack(await reader.readexactly(_SHORT.size))
    if size == -1:
        (size,) = _LONG.unpack(await reader.readexactly(_LONG.size))
    return decode(await reader.readexactly(size))


async def write_message(writer: asyncio.StreamWriter, message: Any) -> None:
    """Write one frame that Connection.recv_bytes reads."""
    payload = encode(message)
    if len(payload) > 0x7FFFFFFF:
        writer.write(_SHORT.pack(-1) + _LONG.pack(len(payload)))
    else:
        writer.write(_SHORT.pack(len(payload)))
    writer.write(payload)
    await writer.drain()
