"""Shared fixtures: tiny random models built at test time, and a real `python -m pipeserve`."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from blockbuster import blockbuster_ctx

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SERVER_START_TIMEOUT_S = 120.0
_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")

WORDS = ["the", "a", "an", "and", "or", "of", "to", "in", "on", "at", "for", "with", "is", "are", "was", "were", "be", "been", "this", "that", "these", "those", "it", "i", "you", "he", "she", "we", "they", "my", "your", "his", "her", "our", "their", "good", "bad", "great", "terrible", "happy", "sad", "movie", "film", "book", "food", "day", "night", "time", "world", "hello", "test", "paris", "france", "capital", "city", "man", "woman", "king", "queen", "love", "hate", "like", "dog", "cat", "red", "blue", "green", "big", "small", "new", "old", "first", "last", "very", "not", "no", "yes"]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_event_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """In-process async tests run the front's code on their loop: any blocking call there
    (a sleep, a blocking socket or file read) fails the test, as it would stall every client."""
    function = getattr(request.node, "obj", None)
    if not inspect.iscoroutinefunction(function):
        yield
        return
    with blockbuster_ctx("pipeserve"):
        yield


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | str | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
    """One HTTP request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body.encode() if isinstance(body, str) else body
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def post_json(port: int, document: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
    return request(port, "POST", "/", json.dumps(document),
                   {"Content-Type": "application/json", **(headers or {})}, **kwargs)


class Server:
    """A `python -m pipeserve` subprocess on a free loopback port, in its own session."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 command: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # One model process unless a test asks for more: the scenarios (kill "the" worker, hold
        # "the" batch) are written for one; --workers 0 (a core each) has its own tests.
        if "--devices" not in args:
            environment["PIPESERVE_WORKERS"] = "1"
        environment.update(env or {})
        self.args = args
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.port = 0
        command = command or [sys.executable, "-m", "pipeserve", "--host", "127.0.0.1", "--port", "0"]
        self.process = subprocess.Popen(
            [*command, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=environment, start_new_session=True, text=True,
            pass_fds=pass_fds)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self._listening.is_set():
                self.port = int(match.group(2))
                self._listening.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, fragment: str, timeout: float = 10.0) -> str:
        """The first output line containing `fragment`, once it has been read (output reaches
        `lines` through a reader thread, so a line can trail the response it was logged before)."""
        return wait_until(lambda: next((line for line in list(self.lines) if fragment in line), None),
                          timeout, message=f"a log line with {fragment!r}")

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not listen (exit code {self.process.poll()}):\n{self.log}")

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> Server:
        self.wait_listening()

        def is_ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
            try:
                return self.request("GET", "/ready").status == 200
            except OSError:
                return False

        wait_until(is_ready, timeout, interval=0.1, message="/ready")
        return self

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
        return request(self.port, method, path, body, headers, timeout)

    def post_json(self, document: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
        return post_json(self.port, document, headers, **kwargs)

    def info(self) -> dict[str, Any]:
        return self.request("GET", "/info").json()

    def worker_pid(self) -> int:
        return int(self.info()["workers"][0]["pid"])

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the exit; then every line it wrote is in `lines`."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None
        self._reader.join(timeout)  # to the end of its output (a worker it left may hold the pipe)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its session (a worker it failed to stop)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    """Start servers for one test; every one is stopped (and its group killed) afterwards."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True,
              command: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> Server:
        server = Server(list(args), env, command, pass_fds)
        servers.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in servers:
        server.stop()


# --- concurrent clients and held batches ---------------------------------------------------------
#
# A test that needs a request to stay in flight holds it on a gate: the custom pipeline's input
# "WAIT:<path>" blocks until the file <path> exists, and the test creates the file to release it.
# What the server does meanwhile (refuse, queue, time out, answer /health, drain) is then checked
# on its own, with nothing racing a sleep.

HELD_TIMEOUT_S = 30.0  # deadline for each wait on a held batch's way in and out


@dataclass
class Answer:
    """One response to an async request: status, headers (lower-case names) and decoded JSON."""

    status: int
    headers: dict[str, str]
    body: Any


def client_session(timeout: float = 60.0) -> aiohttp.ClientSession:
    """A session with no connection limit, so that concurrent requests really are concurrent."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def post(session: aiohttp.ClientSession, server: Server, document: Any,
               headers: dict[str, str] | None = None) -> Answer:
    """POST a JSON document to the server's `/`."""
    async with session.post(f"http://127.0.0.1:{server.port}/", json=document, headers=headers) as response:
        body = await response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.headers.items()},
                      json.loads(body) if body else None)


async def post_all(server: Server, documents: Iterable[Any],
                   headers: dict[str, str] | None = None) -> list[Answer]:
    """POST every document at once, each as its own request; answers in the documents' order."""
    async with client_session() as session:
        return list(await asyncio.gather(*(post(session, server, d, headers) for d in documents)))


async def eventually(predicate: Callable[[], Any], timeout: float = HELD_TIMEOUT_S,
                     message: str = "condition") -> Any:
    """`wait_until` off the event loop, so that the loop keeps sending and reading requests."""
    return await asyncio.to_thread(wait_until, predicate, timeout, message=message)


async def completed(tasks: Sequence[asyncio.Future[Any]], count: int,
                    timeout: float = HELD_TIMEOUT_S) -> list[asyncio.Future[Any]]:
    """Wait until at least `count` of `tasks` are done; return the done ones, in `tasks` order."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {task for task in tasks if not task.done()}
    while len(tasks) - len(pending) < count:
        remaining = deadline - loop.time()
        if remaining <= 0 or not pending:
            raise AssertionError(f"{len(tasks) - len(pending)} of {len(tasks)} requests answered; "
                                 f"expected {count} within {timeout}s")
        _, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    return [task for task in tasks if task.done()]


def input_count(documents: Iterable[Any]) -> int:
    """How many jobs (queued or in-flight inputs) these {"inputs": ...} documents make."""
    return sum(len(d["inputs"]) if isinstance(d["inputs"], list) else 1 for d in documents)


def counters(server: Server) -> dict[str, Any]:
    return server.info()["counters"]


@dataclass
class HeldBatch:
    """Requests held in flight by a gate file until `release()` (or the end of `held_batch`)."""

    gate: Path
    tasks: list[asyncio.Task[Answer]]

    def release(self) -> None:
        self.gate.touch()

    @property
    def answers(self) -> list[Answer]:
        return [task.result() for task in self.tasks]

    @property
    def answer(self) -> Answer:
        (only,) = self.answers
        return only


@contextlib.asynccontextmanager
async def held_batch(session: aiohttp.ClientSession, server: Server, gate: Path,
                     document: Any = None, *, documents: Sequence[Any] | None = None,
                     timeout: float = HELD_TIMEOUT_S) -> AsyncIterator[HeldBatch]:
    """Post request(s) held on `gate` (by default one {"inputs": "WAIT:<gate>"}); once /info shows
    all their inputs in flight, run the body; on the way out release the gate and await them.

    Whatever the body saw answered before it ended was answered while the model was held.
    """
    if documents is None:
        documents = [document if document is not None else {"inputs": f"WAIT:{gate}"}]
    tasks = [asyncio.ensure_future(post(session, server, d)) for d in documents]
    held = HeldBatch(gate, tasks)
    expected = input_count(documents)
    try:
        await eventually(lambda: any(task.done() for task in tasks)
                         or counters(server)["in_flight"] >= expected, timeout,
                         message=f"{expected} held inputs in flight")
        if any(task.done() for task in tasks):
            raise AssertionError(f"a held request was answered before the gate was released: "
                                 f"{[task.result() for task in tasks if task.done()]}")
        yield held
    except BaseException:
        held.release()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    held.release()
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        for task in pending:
            task.cancel()
        raise AssertionError(f"{len(pending)} held requests unanswered {timeout}s after the release")


def restart_load_gate(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """(env, armed, gate) for a server whose restarted workers can be held in their load: the
    first load goes through; once `armed` exists, a load waits until `gate` exists."""
    armed, gate = tmp_path / "load-gate-armed", tmp_path / "load-gate"
    return {"TEST_LOAD_GATE": str(gate), "TEST_LOAD_GATE_ARMED": str(armed)}, armed, gate


async def queue_behind_held_batch(server: Server, gate: Path, documents: Sequence[Any]
                                  ) -> tuple[Answer, list[Answer]]:
    """Hold the worker on `gate`, queue all `documents` behind it, then release: the documents'
    batches form from a queue that holds every one of them (no arrival timing involved).
    Returns the held request's answer and the documents' answers, in order."""
    async with client_session() as session:
        async with held_batch(session, server, gate) as held:
            tasks = [asyncio.ensure_future(post(session, server, d)) for d in documents]
            expected = input_count(documents)
            await eventually(lambda: counters(server)["queue_depth"] == expected,
                             message=f"{expected} inputs queued")
        return held.answer, list(await asyncio.gather(*tasks))


# --- tiny random models ------------------------------------------------------------------------


def _bert_tokenizer(folder: Path) -> Any:
    """A WordPiece tokenizer over a generated vocabulary: the words above, plus single
    characters and ## continuations so that any text tokenizes without [UNK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = {token: index for index, token in enumerate(
        dict.fromkeys(special + WORDS + characters + [f"##{c}" for c in characters]))}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    core.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    # No model_max_length on purpose: the server must cap it from the model's config.
    tokenizer.save_pretrained(folder)
    return tokenizer


def _build_bert(folder: Path, head: str) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model_class = {"fill-mask": BertForMaskedLM, "text-classification": BertForSequenceClassification,
                   "feature-extraction": BertModel}[head]
    model_class(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {task: _build_bert(root / task, task)
            for task in ("fill-mask", "text-classification", "feature-extraction")}


@pytest.fixture(scope="session")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model per further task, built lazily and shared by the session."""
    return _LazyModels(tmp_path_factory.mktemp("task-models"))  # type: ignore[return-value]


class _LazyModels(dict):  # type: ignore[type-arg]
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, task: str) -> Path:
        self[task] = _BUILDERS[task](self.root / task)
        return self[task]


def _bert_with_labels(folder: Path, labels: list[str], head: str) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _bert_tokenizer(folder)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model_class = BertForTokenClassification if head == "token" else BertForSequenceClassification
    model_class(config).eval().save_pretrained(folder)
    return folder


def _build_token_classification(folder: Path) -> Path:
    return _bert_with_labels(folder, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], "token")


def _build_zero_shot(folder: Path) -> Path:
    return _bert_with_labels(folder, ["contradiction", "neutral", "entailment"], "sequence")


def save_gpt2(folder: Path, tokenizer: Any, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
              n_positions: int = 128) -> Path:
    """A random GPT-2 (seed 0) for this tokenizer, saved with it in `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def _build_text_generation(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<pad>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>", bos_token="<eos>")
    return save_gpt2(folder, tokenizer)


def _build_image_classification(folder: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64,
                       id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


def _build_audio_classification(folder: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, feature_size=1, padding_value=0.0,
                             do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            classifier_proj_size=16,
                            id2label={0: "yes", 1: "no"}, label2id={"yes": 0, "no": 1})
    Wav2Vec2ForSequenceClassification(config).eval().save_pretrained(folder)
    return folder


_BUILDERS = {
    "token-classification": _build_token_classification,
    "zero-shot-classification": _build_zero_shot,
    "text-generation": _build_text_generation,
    "image-classification": _build_image_classification,
    "audio-classification": _build_audio_classification,
}


def png_bytes(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float = 0.5, rate: int = 16000, frequency: float = 440.0) -> bytes:
    import io
    import math
    import struct
    import wave

    frames = b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * frequency * n / rate)))
                      for n in range(int(seconds * rate)))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(frames)
    return buffer.getvalue()
