"""Generated streams at their edges, against a real server: clients that leave at every stage
(while the request is read, handed to a busy worker, queued in it, prefilled, decoding), refusals
that come before the first event, and prompts over --max-input-bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from children import GATE_ENV, front_with_entry_point
from conftest import Server, save_gpt2, wait_until
from test_streaming import chat_model  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.timeout(240)
MAX_INPUT_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def generator(chat_model: Path) -> Iterator[Server]:  # noqa: F811 - the fixture above
    # One sequence decodes at a time, so a second one waits in the model process.
    server = Server(["--model", str(chat_model), "--max-running-sequences", "1",
                     "--max-input-bytes", str(MAX_INPUT_BYTES)])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _send(port: int, path: str, document: Any, body_bytes: int | None = None) -> socket.socket:
    """A raw HTTP request on its own connection; `body_bytes` sends only that much of the body."""
    body = json.dumps(document).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head + body[:body_bytes])
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {received[-300:]!r}"
        received += chunk
    return received


def _open_streams(server: Server) -> int:
    return int(server.info()["counters"]["streams"]["open"])


def _streams(server: Server) -> dict[str, int]:
    return dict(server.info()["counters"]["streams"])


def _open_connections(server: Server) -> int:
    """Client connections the front holds open, counting the one that asks."""
    return int(server.info()["counters"]["connections"]["open"])


def _generated_tokens(server: Server) -> int:
    """Tokens the front has handed to open streams (a released stream's later tokens are dropped)."""
    return int(server.request("GET", "/stats").json()["generated_tokens"])


def _running_sequences(server: Server) -> float:
    text = server.request("GET", "/metrics").body.decode()
    return float(re.search(r"^pipeserve_running_sequences\{[^}]*\} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def _long(prompt: str = "the") -> dict[str, Any]:
    return {"inputs": prompt, "parameters": {"max_new_tokens": 400, "ignore_eos": True}}


def _no_stream_left(server: Server) -> None:
    wait_until(lambda: _open_streams(server) == 0 and _running_sequences(server) == 0, 30,
               message="no stream open")


# --- refusals come before the first event ----------------------------------------------------------


@pytest.mark.parametrize(("path", "document", "message"), [
    ("/generate_stream", {"inputs": "the", "parameters": {"max_new_tokens": 1024}}, "from 1 to 1023"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}], "max_tokens": 1024,
                              "stream": True}, "from 1 to 1023"),
    ("/v1/completions", {"prompt": "the", "max_tokens": 1024, "stream": True}, "from 1 to 1023"),
])
def test_new_tokens_that_leave_the_prompt_no_position_are_a_4xx_before_any_event(generator: Server, path: str, document: Any,
                                                              message: str) -> None:
    reply = generator.request("POST", path, json.dumps(document), {"Content-Type": "application/json"})
    assert reply.status == 400, reply.body
    assert reply.headers["content-type"].startswith("application/json")  # not an event stream
    body = reply.json()
    text = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert message in text
    if not path.startswith("/v1/"):
        assert body["error_type"]  # TGI's envelope


# --- size limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "document"), [
    ("/v1/completions", {"prompt": "the " * 20_000}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "the " * 9_000},
                                           {"role": "user", "content": "the " * 9_000}]}),  # 72 KB together
    ("/generate_stream", {"inputs": "the " * 20_000}),
    ("/generate", {"inputs": "the " * 20_000}),
    ("/", {"inputs": "the " * 20_000, "stream": True}),
    ("/decode", {"ids": list(range(20_000))}),  # 80 KB at 4 bytes an id
])
def test_every_route_refuses_an_input_over_max_input_bytes(generator: Server, path: str, document: Any) -> None:
    reply = generator.request("POST", path, json.dumps(document), {"Content-Type": "application/json"})
    assert reply.status == 413, reply.body
    assert "--max-input-bytes" in reply.body.decode()
    assert generator.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 2}}),
                             {"Content-Type": "application/json"}).status == 200


def test_a_long_allowed_prompt_keeps_its_end(generator: Server) -> None:
    """A prompt past the model's positions keeps its last tokens (only its tail is tokenized)."""
    document = {"inputs": "cat " * 15_000 + "dog", "parameters": {"max_new_tokens": 1, "details": True}}
    reply = generator.request("POST", "/generate", json.dumps(document), {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body
    assert reply.json()["details"]["finish_reason"] == "length"


# --- clients that leave --------------------------------------------------------------------------------


def test_a_client_that_leaves_while_its_body_is_read(generator: Server) -> None:
    """No stream exists before the body is whole, so what shows the server noticed the client
    leave is its connection: held open while the rest of the body is awaited, let go once the
    client has closed it; and no stream was opened for the half a request."""
    wait_until(lambda: _open_connections(generator) == 1, 30, message="only the asking connection open")
    before = _streams(generator)
    sock = _send(generator.port, "/generate_stream", _long(), body_bytes=10)  # of a ~90-byte body
    try:
        wait_until(lambda: _open_connections(generator) == 2, 30, message="the half-sent request's connection")
    finally:
        sock.close()
    wait_until(lambda: _open_connections(generator) == 1, 30, message="its connection let go")
    assert _streams(generator) == before  # none opened, none cancelled: the body was never whole
    assert _running_sequences(generator) == 0
    reply = generator.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 2}}),
                              {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body


def test_clients_that_leave_while_their_prompts_are_handed_to_a_stopped_worker(chat_model: Path) -> None:  # noqa: F811
    """The worker cannot read (SIGSTOP): the Generate messages fill the pipe, the later ones wait
    to be handed over, and the clients leave meanwhile. Once it reads again, their sequences are
    cancelled, not left running (nor holding admission, nor tripping the stall watchdog)."""
    generator = Server(["--model", str(chat_model), "--max-running-sequences", "8"]).wait_ready()
    try:
        _leave_a_stopped_worker(generator)
    finally:
        generator.stop()


def _leave_a_stopped_worker(generator: Server) -> None:
    worker = int(generator.info()["workers"][0]["pid"])
    prompt = "the " * 50_000  # 200 KB: a few fill the pipe's buffers
    os.kill(worker, signal.SIGSTOP)
    try:
        clients = [_send(generator.port, "/generate_stream", _long(prompt)) for _ in range(8)]
        wait_until(lambda: _open_streams(generator) == 8, 30, message="8 streams handed over")
        for sock in clients:
            sock.close()
        wait_until(lambda: _open_streams(generator) == 0, 30, message="the front released them")
    finally:
        os.kill(worker, signal.SIGCONT)
    _no_stream_left(generator)
    assert generator.info()["workers"][0]["restarts"] == 0  # the stall watchdog left it alone
    # It serves again, and is not still generating the abandoned sequences first.
    reply = generator.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 2}}),
                              {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body


def test_a_client_that_leaves_while_its_sequence_waits_in_the_worker(generator: Server) -> None:
    running = _send(generator.port, "/generate_stream", _long())
    _read_until(running, b"data:")  # decoding: the one running sequence
    waiting = _send(generator.port, "/generate_stream", _long("a"))
    wait_until(lambda: _open_streams(generator) == 2, 30, message="a second stream, waiting")
    waiting.close()
    wait_until(lambda: _open_streams(generator) == 1, 30, message="the waiting one released")
    running.close()
    _no_stream_left(generator)


@pytest.fixture(scope="module")
def long_context_model(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The chat model's tokenizer on a wider GPT-2 with 4096 positions: a prompt that fills them
    takes about a second to prefill on one CPU thread (a few milliseconds per decoding step)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("long-context") / "tiny-long-context"
    folder.mkdir()
    return save_gpt2(folder, AutoTokenizer.from_pretrained(chat_model), n_embd=256, n_layer=6, n_head=4,
                     n_positions=4096)


def test_a_client_that_leaves_while_its_prompt_is_prefilled(long_context_model: Path) -> None:
    """The client closes once its stream is handed to the worker, while the worker prefills its
    ~3,700-token prompt: the front lets the stream go before its first token, the worker drops
    the sequence after that one forward pass instead of decoding it, and SIGTERM has nothing
    left to wait for."""
    # On the CPU with one thread, so the prefill's length does not depend on the machine's GPU or cores.
    server = Server(["--model", str(long_context_model), "--max-running-sequences", "1",
                     "--device", "cpu", "--threads", "1"]).wait_ready()
    try:
        steps, tokens = _streams(server)["steps"], _generated_tokens(server)
        sock = _send(server.port, "/generate_stream", _long("the " * 4096))  # 400 new tokens: 3,696 kept
        try:
            wait_until(lambda: _open_streams(server) == 1, 30, interval=0.01, message="the stream handed over")
        finally:
            sock.close()  # without reading a byte: before the first event
        wait_until(lambda: _running_sequences(server) == 0, 30, message="pipeserve_running_sequences 0")
        assert _streams(server)["cancelled"] == 1
        assert _generated_tokens(server) == tokens  # it left before its first token reached the front
        # One sequence runs at a time: had the abandoned one gone on decoding, this one would wait
        # behind its 400 steps. Steps: the abandoned prefill, this prefill and one decoding step
        # (and one more, should the Cancel have reached the worker a step late).
        reply = _post(server, "/generate", {"inputs": "the", "parameters": {"max_new_tokens": 2, "ignore_eos": True}})
        assert reply.status == 200, reply.body
        assert _streams(server)["steps"] - steps <= 4, _streams(server)
        _no_stream_left(server)
        _sigterm_exits_at_once(server)
    finally:
        server.stop()


def test_a_client_that_leaves_while_decoding(generator: Server) -> None:
    for path, document in (("/generate_stream", _long()),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}],
                                                     "max_tokens": 400, "ignore_eos": True, "stream": True})):
        sock = _send(generator.port, path, document)
        _read_until(sock, b"data:")
        sock.close()
        _no_stream_left(generator)


def test_after_every_leaver_sigterm_exits_at_once(chat_model: Path) -> None:  # noqa: F811
    server = Server(["--model", str(chat_model), "--max-running-sequences", "1"]).wait_ready()
    try:
        for _ in range(3):
            sock = _send(server.port, "/generate_stream", _long())
            _read_until(sock, b"data:")
            sock.close()
        leaver = _send(server.port, "/generate_stream", _long(), body_bytes=5)
        leaver.close()
        _no_stream_left(server)
        _sigterm_exits_at_once(server)
    finally:
        server.stop()


def _sigterm_exits_at_once(server: Server) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    assert "draining" not in server.log  # nothing was left to wait for
    assert "drain incomplete" not in server.log


# --- one rule on every route ------------------------------------------------------------------------


def _post(server: Server, path: str, document: Any) -> Any:
    return server.request("POST", path, json.dumps(document), {"Content-Type": "application/json"})


def test_an_empty_prompt_starts_from_the_models_first_token(generator: Server) -> None:
    # As transformers does: a text generated from nothing, not a refusal (the document allows "").
    for path, document in (("/generate", {"inputs": "", "parameters": {"max_new_tokens": 3, "ignore_eos": True}}),
                           ("/v1/completions", {"prompt": "", "max_tokens": 3, "ignore_eos": True})):
        reply = _post(generator, path, document)
        assert reply.status == 200, (path, reply.body)
    assert _post(generator, "/generate", {"inputs": "", "parameters": {"max_new_tokens": 3, "ignore_eos": True,
                                                                        "details": True}}
                 ).json()["details"]["generated_tokens"] == 3


def test_a_streamed_answer_carries_its_request_id(generator: Server) -> None:
    """Its headers go out with the first event, before the handler returns."""
    for path, document in (("/generate_stream", {"inputs": "the", "parameters": {"max_new_tokens": 2}}),
                           ("/v1/completions", {"prompt": "the", "max_tokens": 2, "stream": True})):
        reply = generator.request("POST", path, json.dumps(document),
                                  {"Content-Type": "application/json", "X-Request-Id": "streamed-1"})
        assert reply.status == 200 and reply.headers["content-type"] == "text/event-stream", (path, reply.body)
        assert reply.headers.get("x-request-id") == "streamed-1", path


def test_a_list_of_more_prompts_than_the_stream_door_admits_is_answered(generator: Server) -> None:
    """POST / with a list: its prompts take turns for --max-running-sequences' slots (1 here, so
    the door admits 2 streams); all at once, the third was refused and the whole list got 503."""
    prompts = ["the", "a", "cat", "dog", "the cat"]
    parameters = {"max_new_tokens": 2, "ignore_eos": True, "do_sample": False}
    listed = generator.post_json({"inputs": prompts, "parameters": parameters})
    assert listed.status == 200, listed.body
    alone = [_post(generator, "/generate", {"inputs": prompt, "parameters": parameters}).json()
             for prompt in prompts]
    assert listed.json() == alone


def test_a_client_that_stops_reading_is_cut_off_at_its_deadline_and_no_worker_is_blamed(
        chat_model: Path) -> None:  # noqa: F811
    """A client that never reads its stream: the writes wait on full socket buffers. The worker
    finishes the sequence and falls silent; that is not a stall (the watchdog, at
    --batch-timeout 1, killed the healthy worker), and past the stream's deadline the client is
    cut off, which frees its stream (it was held as long as the client held the connection).
    Each OpenAI chunk names the model: a 16 kB name makes 1,000 chunks 16 MB, more than the
    socket buffers (at most 4 MB here) take."""
    server = Server(["--model", str(chat_model), "--batch-timeout", "1", "--served-model-name", "m" * 16000]
                    ).wait_ready()
    try:
        pid = server.worker_pid()
        body = json.dumps({"prompt": "the", "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", server.port))
        with sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"X-Request-Timeout: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            server.wait_log("stopped reading its stream; cut off past the deadline", timeout=60)
            wait_until(lambda: _open_streams(server) == 0, timeout=10)
        assert "no generation step" not in server.log
        assert server.worker_pid() == pid and server.info()["workers"][0]["restarts"] == 0
        assert _post(server, "/generate", {"inputs": "the", "parameters": {"max_new_tokens": 2}}).status == 200
    finally:
        server.stop()


def test_a_temperature_too_small_to_divide_by_is_greedy(generator: Server) -> None:
    # Found by the fuzzer: 1e-308 overflowed the logits into NaN, and the stream failed with a 500.
    tiny = _post(generator, "/generate", {"inputs": "the", "parameters": {
        "temperature": 1.1e-308, "do_sample": True, "max_new_tokens": 4, "ignore_eos": True}})
    greedy = _post(generator, "/generate", {"inputs": "the", "parameters": {
        "do_sample": False, "max_new_tokens": 4, "ignore_eos": True}})
    assert tiny.status == 200 and tiny.json() == greedy.json()


def test_one_temperature_bound_on_every_route(generator: Server) -> None:
    for path, document in (("/generate", {"inputs": "the", "parameters": {"temperature": 2.5}}),
                           ("/", {"inputs": "the", "parameters": {"temperature": 2.5, "details": True}}),
                           ("/v1/completions", {"prompt": "the", "temperature": 2.5}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}],
                                                     "temperature": 2.5})):
        reply = _post(generator, path, document)
        assert reply.status == 400, (path, reply.body)
        body = reply.json()
        message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
        assert message.endswith('temperature" must be a number <= 2.0'), (path, message)
    assert _post(generator, "/generate", {"inputs": "the", "parameters": {"temperature": 2, "max_new_tokens": 2,
                                                                            "seed": 1}}).status == 200


def test_one_default_number_of_new_tokens_on_every_route(generator: Server) -> None:
    tgi = _post(generator, "/generate", {"inputs": "the", "parameters": {"ignore_eos": True, "details": True}})
    completion = _post(generator, "/v1/completions", {"prompt": "the", "ignore_eos": True, "temperature": 0})
    chat = _post(generator, "/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}],
                                                     "ignore_eos": True, "temperature": 0})
    counts = {tgi.json()["details"]["generated_tokens"], completion.json()["usage"]["completion_tokens"],
              chat.json()["usage"]["completion_tokens"]}
    assert counts == {64}, counts


# --- memory ----------------------------------------------------------------------------------------


def test_a_generator_past_max_worker_memory_finishes_its_streams_then_restarts(
        chat_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """Past --max-worker-memory while it generates (checked after every step; a batch-only check
    let a generator grow unchecked) the worker takes no new stream, runs the one it holds to its
    last token, and is then retired by the front and restarted at once. Its memory is read as past
    the limit by the test's entry point around the real model process."""
    gate = tmp_path / "steps"
    server = Server(["--model", str(chat_model), "--max-worker-memory", "64G"], env={GATE_ENV: str(gate)},
                    command=front_with_entry_point("model_past_its_memory_limit_once_serving")).wait_ready()
    try:
        old = server.worker_pid()
        sock = _send(server.port, "/generate_stream", _long())
        received = _read_until(sock, b"data:")  # the first token: the step that brought it said "draining"
        assert server.info()["workers"][0]["draining"] is True
        refused = server.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 2}}),
                                 {"Content-Type": "application/json"})
        assert refused.status == 503, refused.body
        assert "restarting to return memory" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        ready = server.request("GET", "/ready")
        assert ready.status == 503 and ready.json()["reason"] == "recycling"  # a load balancer looks elsewhere
        metrics = server.request("GET", "/metrics").body.decode()
        assert re.search(r'^pipeserve_worker_draining\{[^}]*worker="0"\} 1\.0$', metrics, re.M), metrics
        gate.touch()  # the worker's steps after its first wait for this: the stream was held until now
        while b"\r\n0\r\n\r\n" not in received:  # to the end of the chunked body
            chunk = sock.recv(65536)
            assert chunk, received[-300:]
            received += chunk
        sock.close()
        events = [json.loads(line[5:]) for line in received.decode().splitlines() if line.startswith("data:")]
        assert len(events) == 400 and events[-1]["details"]["finish_reason"] == "length"
        assert not [event for event in events if "error" in event]
        server.wait_log("retired by the front past --max-worker-memory")
        server.wait_log("restart #1 in 0.0s")
        wait_until(lambda: server.info()["workers"][0]["restarts"] == 1 and server.request("GET", "/ready").status == 200,
                   60, message="the worker restarted")
        worker = server.info()["workers"][0]
        assert worker["pid"] != old and worker["draining"] is False
        assert re.search(r'^pipeserve_worker_draining\{[^}]*worker="0"\} 0\.0$',
                         server.request("GET", "/metrics").body.decode(), re.M)
        assert "max-worker-memory" in worker["last_exit"]
        reply = server.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 2}}),
                               {"Content-Type": "application/json"})
        assert reply.status == 200, reply.body
    finally:
        server.stop()


def test_a_generator_killed_after_streaming_is_restarted_every_time(chat_model: Path) -> None:  # noqa: F811
    """A worker that served and was then killed (the OOM killer, an operator) is not a crash loop,
    whether it served batches or streams: two kills past --max-restarts 1 leave the server up.
    Streams used to count for nothing, so a generator's second kill ended the server."""
    server = Server(["--model", str(chat_model), "--max-restarts", "1", "--restart-window", "300"]).wait_ready()
    try:
        for kill in range(1, 3):
            reply = server.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 3}}),
                                   {"Content-Type": "application/json"})
            assert reply.status == 200, reply.body
            os.kill(server.worker_pid(), signal.SIGKILL)
            wait_until(lambda kill=kill: server.info()["workers"][0]["restarts"] == kill
                       and server.request("GET", "/ready").status == 200, 60, message=f"restart #{kill}")
        assert server.process.poll() is None and "giving up" not in server.log
        reply = server.request("POST", "/generate", json.dumps({"inputs": "the", "parameters": {"max_new_tokens": 3}}),
                               {"Content-Type": "application/json"})
        assert reply.status == 200, reply.body
    finally:
        server.stop()


def test_the_stream_door_refuses_with_the_models_own_reason() -> None:
    """A drain past --max-worker-memory that begins while a request's body is read: the stream
    door answers what the runtime answered a moment earlier (its reason and Retry-After), not a
    vaguer 503 of its own; without a runtime to ask, its own."""
    import asyncio

    from pipeserve.front import errors
    from pipeserve.front.streams import Streams

    def recycling() -> None:
        raise errors.Unavailable("the model process is restarting to return memory", retry_after=7)

    async def refusal(streams: Streams) -> errors.Unavailable:
        with pytest.raises(errors.Unavailable) as refused:
            await streams.start("request", "hello", {})
        return refused.value

    asked = asyncio.run(refusal(Streams(2, lambda: [], why_unavailable=recycling)))
    assert "return memory" in asked.message and asked.retry_after == 7
    alone = asyncio.run(refusal(Streams(2, lambda: [])))
    assert "no model process" in alone.message and alone.retry_after == 1


class _Worker:
    """What Streams asks of a worker, in-process: a pipe that takes messages."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    def retire_when_idle(self) -> None:
        pass


@pytest.mark.timeout(10)
def test_a_streams_end_goes_with_its_last_token_of_a_step() -> None:
    """A newcomer can get two tokens in one step (its prefill's, then the decoding's); when it
    ends there, both reach the handler, the end with the second (it was read with the first,
    and the second was lost: one token short of generated_tokens)."""
    import asyncio
    import time

    from pipeserve import ipc
    from pipeserve.front.streams import Streams

    async def events() -> list[tuple[str | None, str | None]]:
        streams = Streams(2, lambda: [_Worker()])
        stream = await streams.start("request", "hello", {})
        other = await streams.start("other", "hi", {})
        token = lambda stream_id, text: ipc.Token(stream_id, 1, text, 0.0, False)  # noqa: E731
        streams.deliver(ipc.Step([token(stream.stream_id, "a"), token(other.stream_id, "x"),
                                  token(stream.stream_id, "b")],
                                 [ipc.StreamEnd(stream.stream_id, "length", 2, 1)]))
        return [(event.token.text if event.token else None, event.end.finish_reason if event.end else None)
                async for event in streams.events(stream, time.monotonic() + 5)]

    assert asyncio.run(events()) == [("a", None), ("b", "length")]


@pytest.mark.timeout(10)
def test_a_handler_cancelled_as_its_event_arrives_stops_reading_its_stream() -> None:
    """A client that leaves just as a token arrives: on Python 3.11, wait_for returns the token
    and loses the cancellation, and a non-streamed handler read on to the sequence's end (its
    generation ran on for nobody). The cancellation is raised after the wait instead."""
    import asyncio
    import time

    from pipeserve import ipc
    from pipeserve.front.streams import Streams

    async def cancelled_as_the_token_comes() -> bool:
        streams = Streams(2, lambda: [_Worker()])
        stream = await streams.start("request", "hello", {})

        async def read() -> list[Any]:
            return [event async for event in streams.events(stream, time.monotonic() + 3)]

        reader = asyncio.ensure_future(read())
        while not stream.queue._getters:  # type: ignore[attr-defined] - until it waits on the queue
            await asyncio.sleep(0)
        streams.deliver(ipc.Step([ipc.Token(stream.stream_id, 1, "a", 0.0, False)]))  # the get completes
        reader.cancel()  # in the same turn of the loop
        try:
            await asyncio.wait_for(reader, 2)
        except asyncio.CancelledError:
            return stream.stream_id not in streams.open  # released, so its sequence is cancelled
        return False

    assert asyncio.run(cancelled_as_the_token_comes())
