"""Hostile and long-running traffic against a real `python -m pipeserve`: slow clients beyond the
descriptor limit, slow bodies, a load that hangs."""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

from conftest import wait_until

ECHO = ("--pipeline", "custom_pipelines:make")
DESCRIPTORS = 256
# Start the front with a small open-files limit (soft and hard), as a default service would have.
LIMITED = [sys.executable, "-c",
           "import resource, runpy, sys; "
           f"resource.setrlimit(resource.RLIMIT_NOFILE, ({DESCRIPTORS}, {DESCRIPTORS})); "
           "sys.argv = ['pipeserve', *sys.argv[1:]]; runpy.run_module('pipeserve', run_name='__main__')",
           "--host", "127.0.0.1", "--port", "0"]


def _slow_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    return sock


def _closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None if it still holds the connection open."""
    sock.settimeout(0.05)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""
    return data


def test_more_slow_connections_than_descriptors_do_not_lock_out_a_normal_client(start_server: Any) -> None:
    server = start_server(*ECHO, "--header-timeout", "3", command=LIMITED)
    slow = [_slow_connection(server.port) for _ in range(DESCRIPTORS + 50)]
    answers: dict[int, bytes] = {}
    try:
        def served() -> bool:
            for sock in slow[:20]:  # keep trickling: the deadline is absolute, not per byte
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            try:
                return server.post_json({"inputs": "normal"}, timeout=5).status == 200
            except OSError:
                return False

        wait_until(served, 30, interval=0.2, message="a normal client answered 200")

        def every_slow_connection_answered() -> bool:
            pending = [sock for index, sock in enumerate(slow) if index not in answers]
            readable, _, _ = select.select(pending, [], [], 0.5)
            for sock in readable:
                data = _closed_by_server(sock)
                if data is not None:
                    answers[slow.index(sock)] = data
            return len(answers) == len(slow)

        wait_until(every_slow_connection_answered, 30, interval=0, message="every slow connection closed")
    finally:
        for sock in slow:
            sock.close()
    refused = [data for data in answers.values() if data.startswith(b"HTTP/1.1 503")]
    timed_out = [data for data in answers.values() if data.startswith(b"HTTP/1.1 408")]
    # Beyond the bound each is refused at once (never an accept loop failing on EMFILE); the
    # admitted ones are closed at the head deadline, trickling or not.
    assert refused and timed_out and len(refused) + len(timed_out) == len(slow)
    counters = server.info()["counters"]["connections"]
    assert counters["refused"] >= len(refused) and counters["head_timeouts"] >= len(timed_out)  # + the normal client's tries
    assert "out of system resource" not in server.log and "Too many open files" not in server.log
    assert server.process.poll() is None


def test_a_body_that_never_arrives_gets_408_and_the_server_keeps_serving(start_server: Any) -> None:
    server = start_server(*ECHO, "--body-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\":")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert "body" in json.loads(body)["error"]
    assert server.post_json({"inputs": "after"}).status == 200


def test_a_load_that_hangs_ends_the_start_with_one_line_and_exit_4(start_server: Any) -> None:
    server = start_server("--pipeline", "custom_pipelines:hang_on_load", "--load-timeout", "2", ready=False)
    started = time.monotonic()
    assert server.wait_exit(60) == 4
    errors = [line for line in server.lines if " ERROR " in f" {line} "]
    assert len(errors) == 1 and "did not load within --load-timeout 2s" in errors[0], server.log
    assert "Traceback" not in server.log
    assert time.monotonic() - started >= 2  # it waited for the timeout, not less


def test_a_minute_of_load_with_the_worker_killed_every_10_seconds(start_server: Any) -> None:
    import asyncio

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import chaos

    server = start_server(*ECHO, env={"TEST_CALL_DELAY_S": "0.01"})
    result = asyncio.run(chaos.soak(server.port, seconds=60, every=10, clients=8))
    assert len(result["kills"]) == 5, result  # type: ignore[arg-type]
    assert chaos.passed(result), result  # every answer 200, or 503 with Retry-After; no reset, no 5xx, no timeout
    assert server.process.poll() is None and "giving up" not in server.log
    server.wait_ready(60)
    assert server.info()["workers"][0]["restarts"] == 5
