"""Every way the server ends leaves a clean log: its exit code, one line saying why, and no
never-retrieved future, pending task or traceback; a worker the front killed is said to be so."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Server, wait_until

ECHO = ("--pipeline", "custom_pipelines:make")
NOISE = ("never retrieved", "Task was destroyed", "Traceback", "Exception ignored", "out of memory?",
         "did not exit in")

pytestmark = pytest.mark.timeout(120)


def _assert_clean(server: Server, code: int) -> None:
    assert server.wait_exit(60) == code, server.log
    for noise in NOISE:
        assert noise not in server.log, f"{noise!r} in the log:\n{server.log}"
    assert f"stopped (exit code {code})" in server.log


def test_a_load_timeout_exits_4_and_stops_the_other_loading_worker(start_server: Callable[..., Server]) -> None:
    server = start_server("--pipeline", "custom_pipelines:hang_on_load", "--load-timeout", "2",
                          env={"PIPESERVE_WORKERS": "2"}, ready=False)
    _assert_clean(server, 4)
    assert "did not load within --load-timeout 2s" in server.log


def test_a_model_that_fails_to_load_exits_3(start_server: Callable[..., Server]) -> None:
    server = start_server("--pipeline", "custom_pipelines:fail_to_load", env={"PIPESERVE_WORKERS": "2"},
                          ready=False)
    _assert_clean(server, 3)
    assert "cannot load model 'custom_pipelines:fail_to_load'" in server.log


def test_a_folder_that_is_no_model_exits_3(start_server: Callable[..., Server], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    server = start_server("--model", str(tmp_path), ready=False)
    _assert_clean(server, 3)
    assert "cannot infer a task" in server.log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_serving_exits_0(start_server: Callable[..., Server], sig: signal.Signals) -> None:
    server = start_server(*ECHO, env={"PIPESERVE_WORKERS": "2"})
    assert server.post_json({"inputs": ["a", "b"]}).status == 200
    server.signal(sig)
    _assert_clean(server, 0)
    assert f"{sig.name} received" in server.log


def test_a_crash_loop_gives_up_with_exit_1(start_server: Callable[..., Server]) -> None:
    server = start_server(*ECHO, "--max-restarts", "0")
    reply = server.post_json({"inputs": "EXIT"})
    assert reply.status >= 500 and "error" in reply.json()
    _assert_clean(server, 1)
    assert "giving up" in server.log


def test_a_worker_killed_for_its_batch_timeout_is_logged_as_killed_by_the_front(
        start_server: Callable[..., Server]) -> None:
    server = start_server(*ECHO, "--batch-timeout", "1")
    reply = server.request("POST", "/", json.dumps({"inputs": "HANG"}), {"Content-Type": "application/json"})
    assert reply.status == 504, reply.body
    death = server.wait_log("died:")
    assert "killed by the front with SIGKILL (a batch ran past --batch-timeout 1s)" in death
    wait_until(lambda: server.log.count(" ready in ") == 2, 60, message="the restarted worker ready")
    assert server.post_json({"inputs": "after"}).status == 200
    server.signal(signal.SIGTERM)
    _assert_clean(server, 0)
