"""Shared fixtures: tiny random models built at test time, and a real `python -m pipeserve`."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
SERVER_START_TIMEOUT_S = 120.0
_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")

WORDS = (
    "the a an and or of to in on at for with is are was were be been this that these those it "
    "i you he she we they my your his her our their good bad great terrible happy sad movie film "
    "book food day night time world hello test paris france capital city man woman king queen "
    "love hate like dog cat red blue green big small new old first last very not no yes"
).split()


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


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """A `python -m pipeserve` subprocess on a free loopback port, in its own session."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 command: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
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
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body.encode() if isinstance(body, str) else body
            connection.request(method, path, body=data, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         response.read())
        finally:
            connection.close()

    def post_json(self, document: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
        return self.request("POST", "/", json.dumps(document),
                            {"Content-Type": "application/json", **(headers or {})}, **kwargs)

    def info(self) -> dict[str, Any]:
        return self.request("GET", "/info").json()

    def worker_pid(self) -> int:
        return int(self.info()["workers"][0]["pid"])

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None

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


# --- tiny random models ------------------------------------------------------------------------


def _write_vocab(folder: Path) -> Path:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = special + WORDS + characters + [f"##{c}" for c in characters]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def _build_bert(folder: Path, head: str) -> Path:
    import torch
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification,
                              BertModel, BertTokenizerFast)

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab_file=str(_write_vocab(folder)))
    tokenizer.save_pretrained(folder)
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
