"""The pipe protocol between the front and a model process, and the vocabulary both sides share.

This is the only pipeserve module that both processes import (besides the stdlib-only `logs`),
and it imports nothing of either side: the front can read it without loading model code, and
the model process without loading aiohttp.

Messages form a closed set: the front sends `Batch`, `Generate`, `Cancel`, `Shutdown` and
`Retire` (past --max-worker-memory); the model process sends `Ready` (after loading and warming
up), `BatchResult` (one per `Batch`), `Step` (one per decoding step while sequences are
generated: their new tokens and ends) and `Fatal` (when it cannot load). Errors cross as data
(an `ErrorKind` and a safe message), never as pickled exceptions; outputs cross as plain Python
and numpy values, so unpickling them in the front never imports torch.

Frames use the wire format of `multiprocess.connection.Connection.send_bytes` (a 4-byte
big-endian signed length, or -1 and an 8-byte length for frames over 2 GiB): the model process
uses a plain blocking Connection while the front reads and writes the same socket with asyncio
streams and never blocks its event loop.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import pickle
import re
import struct
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 8
# The model process the front starts, named (as gunicorn names a worker class) so that the
# front never imports model code; tests name torch-free children the same way.
MODEL_ENTRY_POINT = "pipeserve.model_proc:main"


class ExitCode(enum.IntEnum):
    """Exit codes of both processes; LOAD_FAILED means the same thing from either."""

    OK = 0
    CRASH_LOOP = 1  # the front: a worker kept dying, let the service manager take over
    USAGE = 2  # argparse's convention
    LOAD_FAILED = 3  # the model (or custom pipeline) could not be loaded
    LOAD_TIMEOUT = 4  # the front: a load (or a restart's load) ran past --load-timeout
    MEMORY_LIMIT = 75  # EX_TEMPFAIL: a worker grew past --max-worker-memory; restart at once
    PIPE_CLOSED = 76  # a worker lost its pipe: the front went away
    DEVICE_ERROR = 77  # a worker's CUDA context broke (not out of memory): only a new process recovers


class WorkerState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


# Generation runs in the model process's continuous-batching engine, fastest with every core in
# one process; the front tells such a model before it loads by its task or, for a local folder,
# by the architectures in its config.json (front/config.py's worker count).
GENERATION_TASK = "text-generation"
EMBEDDING_TASK = "feature-extraction"
CLASSIFICATION_TASK = "text-classification"  # TEI's /predict and /rerank (a cross-encoder)
GENERATION_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


class InputKind(enum.StrEnum):
    """What one input of the loaded pipeline is: text, or the bytes of an image or audio file."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


# Tokens a generation request may leave unsaid: the same on every route (OpenAI's, TGI's, the
# Inference API's) and in the engine.
DEFAULT_MAX_NEW_TOKENS = 64


class ErrorKind(enum.StrEnum):
    """Why one input failed in the model process; `status` is the HTTP status it becomes."""

    BAD_INPUT = "bad_input"
    TOO_LARGE = "too_large"  # over a size limit of pipeserve's own (--max-image-pixels)
    OUT_OF_MEMORY = "out_of_memory"
    INTERNAL = "internal"

    @property
    def status(self) -> int:
        return {"bad_input": 400, "too_large": 413, "out_of_memory": 413, "internal": 500}[self.value]


class Op(enum.StrEnum):
    """What a batch asks of the model process: the pipeline, or only its tokenizer."""

    PIPELINE = "pipeline"
    TOKENIZE = "tokenize"  # input: text -> [{"id", "text", "special", "start", "stop"}]
    DECODE = "decode"  # input: a list of token ids -> text


class ParamType(enum.StrEnum):
    """The type a documented pipeline parameter must have; ANY is checked by the pipeline."""

    ANY = "any"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    STRING = "string"
    STRINGS = "strings"  # a string or a non-empty list of strings
    CHOICE = "choice"  # a string from `choices`, case-insensitive
    OBJECT = "object"


@dataclass(frozen=True)
class ParamSpec:
    """One keyword the loaded pipeline takes, and what its value must be."""

    name: str
    type: ParamType = ParamType.ANY
    minimum: float | None = None
    maximum: float | None = None  # e.g. dimensions: at most the model's embedding size
    choices: tuple[str, ...] = ()
    contains: str | None = None  # a STRING that must contain this (hypothesis_template's "{}")


@dataclass(frozen=True)
class WorkerSpec:
    """What a model process is started with (the spawn argument, not a pipe message)."""

    model: str
    task: str | None
    pipeline: str | None
    device: str
    dtype: str
    threads: int
    max_worker_memory: int | None
    log_level: str
    # False on a restart: a reload measured a little over --max-worker-memory serves, drains
    # after its first batch or step and is restarted again; it is no reason to stop serving.
    first_start: bool = True
    log_format: str = "text"
    worker_index: int = 0
    worker_name: str = "worker[0]"  # how logs name it: worker[i], or MODEL/worker[i] with several models
    # With --devices cuda:N: CUDA_VISIBLE_DEVICES for this worker, which then uses cuda:0.
    visible_devices: str | None = None
    max_running_sequences: int = 32  # generated sequences sharing one decoding step
    prefix_cache_bytes: int = 0  # kept keys and values of ended sequences, for prompts that start with them
    max_batch_prefill_tokens: int = 4096  # prompt tokens one generation step prefills at most
    # The front's pid: a model process whose parent is no longer this is an orphan. Not "PID 1
    # means orphaned": in a container the front itself is PID 1.
    parent_pid: int = 0
    max_image_pixels: int | None = None  # an image larger (width x height) is refused before decoding
    # The malloc the front set up for it (front/allocator.py): "glibc" is trimmed after batches;
    # tcmalloc, or any malloc an operator preloaded (jemalloc), is left alone.
    allocator: str = "glibc"

    def past_memory_limit(self, rss: int) -> bool:
        """A resident size past --max-worker-memory: both processes read a process's RSS by this."""
        limit = self.max_worker_memory
        if not limit:
            return False
        return rss > limit


@dataclass(frozen=True)
class Agreement:
    """How a reduced precision's answers compared with float32's on the warm-up check inputs."""

    same_answers: bool  # every label, word, offset and generated token identical
    inputs: int
    mean_cosine: float | None = None  # over the float vectors (embeddings), where answers have any
    min_cosine: float | None = None


@dataclass(frozen=True)
class Precision:
    """The dtype a worker serves in, and why (`--dtype auto` checks before it reduces)."""

    requested: str  # the --dtype setting
    dtype: str  # what the model computes in
    candidate: str | None = None  # the reduced dtype auto considered, if any
    agreement: Agreement | None = None
    note: str = ""


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
    # The parameter schema: the keywords the pipeline takes; the front validates against it.
    parameters: tuple[ParamSpec, ...]
    # True when the pipeline also takes keywords it does not name (a custom **kwargs).
    open_parameters: bool = False
    input_kind: InputKind = InputKind.TEXT
    # Facts of the loaded model for the API dialects' /info and routes (plain JSON values):
    # max_input_length, labels, hidden_size, pooling, normalize, has_tokenizer, prompts, and a
    # generator's decoding_steps (model/lean_decode.py's path or transformers').
    details: dict[str, Any] = field(default_factory=dict)
    precision: Precision | None = None


@dataclass(frozen=True)
class Batch:
    """One pipeline call: all inputs share the same parameters."""

    batch_id: int
    inputs: list[Any]
    parameters: dict[str, Any]
    request_ids: list[str] = field(default_factory=list)  # for the model process's log lines
    op: Op = Op.PIPELINE


@dataclass(frozen=True)
class Ok:
    value: Any
    tokens: int | None = None  # the input's token count, where the adapter knows it (usage)


@dataclass(frozen=True)
class Failed:
    kind: ErrorKind
    message: str  # safe to show to a client (see public_message)


Outcome = Ok | Failed


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
class Generate:
    """Start one generated sequence, streamed back token by token in Step messages.

    `prompt` is the text to continue, or None with `messages` (a chat, rendered by the
    tokenizer's chat template in the model process). `parameters` are checked by the front:
    max_new_tokens, do_sample, temperature, top_p, top_k, seed, stop, ignore_eos.
    """

    stream_id: int
    prompt: str | None
    parameters: dict[str, Any]
    request_id: str = "-"
    messages: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Cancel:
    """Stop a sequence at the next step (its client went away, or its deadline passed)."""

    stream_id: int


@dataclass(frozen=True)
class Token:
    stream_id: int
    id: int
    text: str  # this token's share of the decoded text (may be "" mid-character)
    logprob: float
    special: bool


@dataclass(frozen=True)
class StreamEnd:
    """A sequence is over: finished, cancelled, or failed (`error`)."""

    stream_id: int
    finish_reason: str  # length | eos_token | stop_sequence | cancelled | error
    generated_tokens: int
    prompt_tokens: int
    seed: int | None = None
    error: Failed | None = None
    cached_tokens: int = 0  # of prompt_tokens, those whose keys and values a kept prefix gave


@dataclass(frozen=True)
class Step:
    """One decoding step of every running sequence: each new token, and the sequences that ended."""

    tokens: list[Token]
    ended: list[StreamEnd] = field(default_factory=list)
    # The process has grown past --max-worker-memory: the front sends it no new sequence, and
    # `Retire` once it holds none.
    draining: bool = False


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more and exit 0."""


@dataclass(frozen=True)
class Retire:
    """Exit with MEMORY_LIMIT, for a restart, once no sequence is being generated. The front
    sends it to a process past --max-worker-memory when that process holds no stream and no
    batch of its: the pipe is ordered, so everything sent before it is served first."""


@dataclass(frozen=True)
class Fatal:
    """The worker cannot serve (the model did not load); it exits right after sending this."""

    reason: str  # one line, safe to log and show
    detail: str = field(default="", repr=False)  # the traceback, for --log-level debug


ToWorker = Batch | Generate | Cancel | Shutdown | Retire
FromWorker = Ready | BatchResult | Step | Fatal
_MESSAGE_TYPES = (Ready, Batch, BatchResult, Generate, Cancel, Step, Shutdown, Retire, Fatal)


class ProtocolError(Exception):
    """A frame that is not one of this module's messages."""


def encode(message: ToWorker | FromWorker) -> bytes:
    if not isinstance(message, _MESSAGE_TYPES):
        raise ProtocolError(f"not a protocol message: {type(message).__name__}")
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(frame: bytes) -> ToWorker | FromWorker:
    try:
        message = pickle.loads(frame)
    except Exception as exc:  # noqa: BLE001 - any undecodable frame is the same protocol error
        raise ProtocolError(f"undecodable frame ({type(exc).__name__})") from None
    if not isinstance(message, _MESSAGE_TYPES):
        raise ProtocolError(f"unexpected message type {type(message).__name__}")
    return message


# --- the child's entry point, resolved by name in the child -----------------------------------


def run_entry_point(entry_point: str, conn: Any, spec: WorkerSpec) -> None:
    """Spawn target: import `module:function` in the new process and call it with (conn, spec)."""
    module_name, _, function_name = entry_point.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    function(conn, spec)


# --- messages that are safe to show ------------------------------------------------------------

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-~@+]+){2,}[/\\]?")
_MAX_PUBLIC_MESSAGE = 300


def public_message(text: str) -> str:
    """The first line of an exception message, without file paths, short enough to show."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = _PATH.sub("<path>", first)
    if len(first) > _MAX_PUBLIC_MESSAGE:
        first = first[: _MAX_PUBLIC_MESSAGE - 1] + "…"
    return first


# --- asyncio side of the framing (the front) ---------------------------------------------------

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


async def read_message(reader: asyncio.StreamReader) -> ToWorker | FromWorker:
    """Read one frame written by Connection.send_bytes; raises IncompleteReadError on EOF."""
    (size,) = _SHORT.unpack(await reader.readexactly(_SHORT.size))
    if size == -1:
        (size,) = _LONG.unpack(await reader.readexactly(_LONG.size))
    elif size < 0:
        raise ProtocolError(f"bad frame length {size}")
    return decode(await reader.readexactly(size))


async def write_message(writer: asyncio.StreamWriter, message: ToWorker | FromWorker) -> None:
    """Write one frame that Connection.recv_bytes reads."""
    payload = encode(message)
    if len(payload) > 0x7FFFFFFF:
        writer.write(_SHORT.pack(-1) + _LONG.pack(len(payload)))
    else:
        writer.write(_SHORT.pack(len(payload)))
    writer.write(payload)
    await writer.drain()
