"""The server's settings: one frozen dataclass, each field declared once.

Every field carries its default, its parser (which validates) and its help text; the command-line
flags (`--max-batch-size`) and environment variables (`PIPESERVE_MAX_BATCH_SIZE`) are generated
from these declarations, so a setting cannot be documented in one place and forgotten in another.
Precedence: flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pipeserve.front import allocator, machine, parsers
from pipeserve.front.parsers import parse_size

ENV_PREFIX = "PIPESERVE_"
LOG_LEVELS = ("debug", "info", "warning", "error")
DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")


# --- declarations ---------------------------------------------------------------------------------


def setting(default: Any, parse: Callable[[str], Any], help: str, metavar: str | None = None,
            secret: bool = False, shown: str | None = None, repeat: bool = False) -> Any:
    """Declare one setting: its default, parser and help text (the flag and variable follow).

    `shown` says what the default means where its value alone would not (None, 0). A `repeat`
    flag may be given several times (one per model: front/deployment.py reads them).
    """
    return field(default=default, repr=not secret,
                 metadata={"parse": parse, "help": help, "metavar": metavar, "shown": shown,
                           "secret": secret, "repeat": repeat})


# A request's inputs enter the queue this many batches per worker at a time (api/common.py):
# enough for length-aware batching to choose from, few enough that a request arriving meanwhile
# waits behind one window, not behind the whole of a large request.
WINDOW_BATCHES_PER_WORKER = 2


@dataclass(frozen=True)
class Config:
    """Everything the server can be told. Immutable once parsed."""

    model: str | None = setting(
        None, parsers.optional_text,
        "Hub id or local path of the model; NAME=ID_OR_PATH, repeated, serves several models, each "
        "under its name.", "[NAME=]ID_OR_PATH", shown="the embedded all-MiniLM-L6-v2", repeat=True)
    task: str | None = setting(
        None, parsers.optional_text,
        "Pipeline task, e.g. fill-mask; NAME=TASK for one of several models.", "[NAME=]TASK",
        shown="what transformers infers from the model", repeat=True)
    config: str | None = setting(
        None, parsers.optional_text,
        "TOML file of models: a [models.NAME] table each, with `model` and any of that model's "
        "own settings (workers, dtype, max_batch_size, ...); flags and variables set the defaults.",
        "FILE", shown="none")
    pipeline: str | None = setting(
        None, parsers.pipeline_ref,
        "Custom pipeline factory module:function, called once in the model process; it returns a "
        "callable taking (inputs: list, **parameters) and returning one output per input.",
        "MODULE:FUNC", shown="none")
    host: str = setting("127.0.0.1", parsers.text,
                        "Address to bind: 0.0.0.0 = every IPv4 address; :: = every IPv6 address, IPv6 only; "
                        "an empty value = every address of both.", "ADDR")
    port: int = setting(8000, parsers.port, "TCP port to bind (0 picks a free port).", "PORT")
    device: str = setting(
        "auto", parsers.device, "auto|cpu|cuda|cuda:N; auto = CUDA when available.", "DEV")
    devices: tuple[str, ...] | None = setting(
        None, parsers.devices,
        "One model process per listed device, e.g. cuda:0,cuda:1 (each sees only its own GPU) "
        "or cpu,cpu; replaces --device and --workers.", "LIST", shown="none")
    dtype: str = setting(
        "auto", parsers.choice(*DTYPES),
        "auto|float32|float16|bfloat16|int8; auto = bfloat16 where the device runs it natively (a GPU "
        "with bf16, a CPU with avx512_bf16 or AMX; float16 on an older GPU) and its answers agree with "
        "float32's at warm-up, else float32 (a text generator: the fastest of float32, bfloat16 and int8 "
        "weights whose greedy tokens agree, timed at warm-up, float32 unless another is a tenth faster); "
        "int8 (opt-in, CPU) = dynamic int8 layers "
        "kept only where answers hold its floor (VNNI needed), for a generator int8 weights with "
        "8-bit activations per row and float32 between the layers (VNNI), else bfloat16 activations "
        "(see README).", "DTYPE")
    max_batch_size: int = setting(
        32, parsers.positive_int, "Most items in one pipeline call.", "N")
    max_batch_delay_ms: float = setting(
        0.0, parsers.non_negative_float,
        "Longest a batch waits for more items, counted from its first item's arrival "
        "(see README).", "MS", shown="0: take only what is already queued")
    max_batch_tokens: int = setting(
        0, parsers.non_negative_int,
        "Most padded tokens in one batch (longest input's estimate x batch size); smaller on a "
        "CPU, where a bigger batch gains no speed but holds a model process longer (see README).",
        "N", shown=f"0 = {machine.CPU_BATCH_TOKENS} on a CPU, {machine.GPU_BATCH_TOKENS} on a GPU")
    batch_order: str = setting(
        "length", parsers.choice("length", "arrival"),
        "length: batch inputs of similar length together (the oldest always goes next); "
        "arrival: first come, first batched.", "ORDER")
    shortest_first_ms: float | None = setting(
        None, parsers.optional_positive_float,
        "With --batch-order length, build each batch around the shortest queued input rather than "
        "the oldest, until the oldest has waited this long (see README).", "MS", shown="off")
    batch_window: float | None = setting(
        None, parsers.optional_positive_float,
        "With --batch-order length, a batch takes only inputs that arrived within N batch times "
        "(the recent mean compute time of a batch) of the oldest queued one, so later inputs "
        "overtake it for a bounded time: a shorter latency tail (see README).", "N", shown="off")
    min_batch_fill: float | None = setting(
        None, parsers.optional_fraction,
        "With --batch-order length, leave an input for the next batch rather than fill a batch "
        "below this share of real (unpadded) tokens.",
        "F", shown=f"auto = {machine.CPU_MIN_BATCH_FILL} on a CPU (best measured), "
        f"{machine.GPU_MIN_BATCH_FILL:g} on a GPU, where padding is nearly free")
    max_queue: int = setting(
        128, parsers.positive_int,
        "Most items waiting for the model; beyond it requests get 503 at once.", "N")
    max_queue_wait_ms: float | None = setting(
        None, parsers.optional_positive_float,
        "Refuse new requests with 503 while the oldest queued input has waited longer than this.",
        "MS", shown="off")
    request_timeout: float = setting(
        30.0, parsers.positive_float,
        "Seconds a request may take before it gets 504 (a request's X-Request-Timeout header may "
        "only shorten it).", "S")
    generation_timeout: float = setting(
        600.0, parsers.positive_float,
        "Seconds a text generation (streamed or not) may take before it ends with a timeout "
        "error; a request's X-Request-Timeout header may only shorten it. Longer than "
        "--request-timeout because a long generation under load legitimately takes minutes.", "S")
    batch_timeout: float = setting(
        120.0, parsers.positive_float,
        "Seconds one pipeline batch may run before its worker is killed and restarted and its "
        "requests get 504; also the longest a worker with open streams may go without a "
        "generation step (its streams then end with an error event).", "S")
    drain_timeout: float = setting(
        30.0, parsers.non_negative_float,
        "On SIGTERM/SIGINT, seconds to let queued and running jobs finish.", "S")
    load_timeout: float = setting(
        600.0, parsers.positive_float,
        "Seconds a model process may take to load and warm up (a download included), at start or "
        "on a restart, before the server gives up and exits 4.", "S")
    max_restarts: int = setting(
        5, parsers.non_negative_int,
        "Crash-loop deaths (while loading, or before completing a batch since ready) tolerated "
        "within --restart-window before the server gives up and exits 1.", "N")
    restart_window: float = setting(
        60.0, parsers.positive_float, "Window in seconds for --max-restarts.", "S")
    max_worker_memory: int | None = setting(
        None, parsers.optional_size,
        "Restart a worker cleanly once its RSS exceeds this (e.g. 4G), read after every batch and "
        "decoding step: it takes no new work and finishes what it holds first.", "SIZE",
        shown="no limit")
    allocator: str = setting(
        "auto", parsers.choice(*allocator.CHOICES),
        "The model processes' memory allocator: tcmalloc (preloaded) keeps their RSS flat at full "
        "speed; glibc trims its heap after batches instead (a few percent slower); auto = tcmalloc where "
        "installed (apt install libtcmalloc-minimal4), else glibc.", "NAME")
    max_body_bytes: int = setting(
        16 * 1024 * 1024, parse_size,
        "Largest request body; larger gets 413 (room for a client batch of --max-items chunks).",
        "SIZE", shown="16M")
    max_items: int = setting(
        2048, parsers.positive_int,
        "Most inputs in one request; more gets 413. A request enters the queue a window at a time.",
        "N")
    max_input_bytes: int = setting(
        256 * 1024, parse_size, "Largest single input (UTF-8 text or a file); larger gets 413.",
        "SIZE", shown="256K")
    max_image_pixels: int = setting(
        64 * 1024 * 1024, parse_size,
        "Most pixels (width x height) in one image input, read from its header before it is "
        "decoded; more gets 413.", "N", shown="64M")
    max_loaded_models: int = setting(
        0, parsers.non_negative_int,
        "Most models loaded at once; a request for another loads it, unloading the least recently "
        "used idle one.", "N", shown="0 = all")
    keep_alive: float | None = setting(
        None, parsers.keep_alive,
        "Unload a model idle this long (e.g. 5m); its next request loads it again.", "DURATION",
        shown="forever")
    served_model_name: str | None = setting(
        None, parsers.optional_text,
        "The model name the OpenAI and TEI APIs report (and /v1/models lists).", "NAME",
        shown="a local folder's name, a hub id as given, sentence-transformers/all-MiniLM-L6-v2 for the embedded model")
    max_running_sequences: int = setting(
        32, parsers.positive_int,
        "Generated sequences one model process decodes together (continuous batching); as many "
        "more may wait in it, and beyond that a new stream gets 503 at once.", "N")
    max_batch_prefill_tokens: int = setting(
        4096, parsers.positive_int,
        "Prompt tokens one generation step prefills at most (rows x the longest, as TGI's flag): "
        "running streams wait for a prefill, so on a CPU a lower value keeps their next token "
        "sooner; a longer prompt is prefilled this many tokens a step (chunked).", "N")
    prefix_cache_bytes: int = setting(
        512 * 1024 * 1024, parsers.size_or_off,
        "Memory each model process keeps the keys and values of ended sequences in, so that a prompt "
        "starting with one (a chat's system prompt and earlier turns) prefills only the rest; "
        "least recently used first out. 0 turns prefix reuse off.", "SIZE", shown="512M")
    max_new_tokens: int = setting(
        1024, parsers.positive_int, "Most tokens one request may ask to generate; more gets 400.", "N")
    max_connections: int = setting(
        1000, parsers.positive_int,
        "Most open client connections; beyond it a connection is answered 503 and closed at once "
        "(lowered to fit the open-files limit).", "N")
    header_timeout: float = setting(
        10.0, parsers.positive_float,
        "Seconds a new connection has to send a whole request head; then 408 and close.", "S")
    body_timeout: float = setting(
        30.0, parsers.positive_float,
        "Seconds a request has to send its whole body once its head is in; then 408.", "S")
    keepalive_timeout: float = setting(
        15.0, parsers.positive_float,
        "Seconds an idle keep-alive connection stays open; a later request on it must complete "
        "its head within this time of the last response.", "S")
    api_key: str | None = setting(
        None, parsers.optional_text,
        "Require 'Authorization: Bearer <key>' on every route but /health and /ready.", "KEY",
        secret=True, shown="none")
    api_key_file: str | None = setting(
        None, parsers.secret_from_file,
        "Read the API key from this file (e.g. a systemd credential); wins over --api-key.",
        "PATH", secret=True, shown="none")
    workers: int = setting(
        0, parsers.non_negative_int, "Model processes behind the front.", "N",
        shown=f"0 = one per core on a CPU (at most {machine.MAX_AUTO_WORKERS}), one on a GPU or for a text generator")
    threads: int = setting(
        0, parsers.non_negative_int,
        "Torch threads per model process.", "N",
        shown="0 = the cores this process may use divided by --workers")
    log_format: str = setting(
        "text", parsers.choice("text", "json"),
        "text: plain lines (no timestamps under systemd, whose journal stamps them); json: one "
        "object per line for log shippers.", "FORMAT")
    log_level: str = setting(
        "info", parsers.choice(*LOG_LEVELS), "debug|info|warning|error.", "LEVEL")

    def required_api_key(self) -> str | None:
        return self.api_key_file or self.api_key

    def worker_count(self) -> int:
        if self.devices:
            return len(self.devices)
        if self.workers:
            return self.workers
        if machine.gpu_likely(self.device) or machine.generates_text(self.model, self.task):
            return 1
        return min(machine.cores(), machine.MAX_AUTO_WORKERS)

    def on_gpu(self) -> bool:
        """Whether any model process will (or, for auto, is likely to) run on a GPU."""
        return any(machine.gpu_likely(device) for device in self.devices or (self.device,))

    def batch_tokens(self, gpu: bool | None = None) -> int:
        """Most padded tokens in one batch: the flag, or the default for the device (`gpu`: what
        a model process reported; None: the front's guess)."""
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return machine.GPU_BATCH_TOKENS if (self.on_gpu() if gpu is None else gpu) else machine.CPU_BATCH_TOKENS

    def batch_fill(self, gpu: bool | None = None) -> float:
        """Least share of real tokens in a length-ordered batch: the flag, or the device's default."""
        if self.min_batch_fill is not None:
            return self.min_batch_fill
        return machine.GPU_MIN_BATCH_FILL if (self.on_gpu() if gpu is None else gpu) else machine.CPU_MIN_BATCH_FILL

    def queue_reserve(self) -> int:
        """Room in the queue that a large request's windows leave to others: one batch."""
        return min(self.max_batch_size, self.max_queue // 2)

    def admission_window(self) -> int:
        """Most inputs of one request in the queue at a time: within the queue less its reserve,
        so a request of --max-items inputs is admitted on an idle server whatever --workers is,
        and a one-text request arriving meanwhile still finds room."""
        return min(WINDOW_BATCHES_PER_WORKER * self.max_batch_size * self.worker_count(),
                   self.max_queue - self.queue_reserve())

    def derived(self, gpu: bool | None = None) -> dict[str, Any]:
        """The values in force where a setting's default depends on the machine (for /info)."""
        gpu = self.on_gpu() if gpu is None else gpu
        return {"workers": self.worker_count(), "threads": self.torch_threads(), "cores": machine.cores(),
                "gpu": gpu, "max_batch_tokens": self.batch_tokens(gpu),
                "min_batch_fill": self.batch_fill(gpu), "admission_window": self.admission_window()}

    def worker_device(self, index: int) -> str:
        return self.devices[index] if self.devices else self.device

    def torch_threads(self) -> int:
        """Threads each worker gives torch: the flag, or the cores shared out between workers."""
        if self.threads:
            return self.threads
        return max(1, machine.cores() // self.worker_count())


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pipeserve: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m pipeserve",
        description="Serve a transformers pipeline over HTTP from a separate, batching model "
        f"process. Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG> "
        "(e.g. PIPESERVE_MAX_BATCH_SIZE=16); a flag wins over the variable.",
    )
    for f in dataclasses.fields(Config):
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=_for_argparse(f.metadata["parse"]),
            default=argparse.SUPPRESS,
            action="append" if f.metadata["repeat"] else "store",
            metavar=f.metadata["metavar"],
            help=f"{f.metadata['help']} [default: {default_text(f)}; env {env_name(f.name)}]",
        )
    return parser


def default_text(f: dataclasses.Field[Any]) -> str:
    """A setting's default as its help shows it: what `shown` says, or the value as a flag takes it."""
    if f.metadata["shown"] is not None:
        return str(f.metadata["shown"])
    return "none" if f.default is None else f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def public_settings(config: Config) -> dict[str, Any]:
    """Every setting but the secrets, by name: what /info reports."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if not f.metadata["secret"]}


def _for_argparse(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            # argparse turns ArgumentTypeError into "argument --flag: <message>".
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


class ConfigError(ValueError):
    """A setting from the environment that does not parse."""


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """One model's settings: flags, then PIPESERVE_* variables, then defaults; exit 2 on a usage
    error (front/deployment.py reads several models)."""
    values, repeated = parse_settings(argv, environ)
    for name, given in repeated.items():
        if len(given) > 1:
            build_parser().error(f"--{name.replace('_', '-')} is given {len(given)} times")
        values[name] = given[0]
    return Config(**values)


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(settings, {repeatable setting: every value given}) from flags, then PIPESERVE_* variables
    (a repeatable one's variable is one value); exit 2 on a usage error."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    repeated: dict[str, list[Any]] = {}
    for f in dataclasses.fields(Config):
        if f.name in namespace and f.metadata["repeat"]:
            repeated[f.name] = [value for value in namespace[f.name] if value is not None]
        elif f.name in namespace:
            values[f.name] = namespace[f.name]
        elif env_name(f.name) in environ:
            try:
                value = f.metadata["parse"](environ[env_name(f.name)])
            except ValueError as exc:
                parser.error(f"{env_name(f.name)}: {exc}")
            if f.metadata["repeat"]:
                repeated[f.name] = [value] if value is not None else []
            else:
                values[f.name] = value
    if values.get("devices") and "workers" in values and values["workers"] != len(values["devices"]):
        parser.error(f"--workers {values['workers']} contradicts --devices, which starts "
                     f"{len(values['devices'])} workers (one per device)")
    return values, {name: given for name, given in repeated.items() if given}
