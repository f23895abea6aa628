"""Operations: Prometheus metrics, access logs, JSON logs, systemd notify and socket activation."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until

ECHO = ("--pipeline", "custom_pipelines:make")
REPO = Path(__file__).resolve().parents[1]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_in_prometheus_format(start_server: Any) -> None:
    server = start_server(*ECHO)
    for index in range(3):
        assert server.post_json({"inputs": f"m{index}"}).status == 200
    assert server.post_json({"inputs": 1}).status == 400
    reply = server.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = _samples(reply.body.decode())
    model = ("model", "custom_pipelines:make")  # every per-model figure names its model
    assert samples[("pipeserve_requests_total", (model, ("route", "/"), ("status", "200")))] == 3
    assert samples[("pipeserve_requests_total", (model, ("route", "/"), ("status", "400")))] == 1
    assert samples[("pipeserve_request_duration_seconds_count", (model, ("route", "/")))] == 4
    assert samples[("pipeserve_batch_size_count", (model,))] >= 3  # the warm-up is not a batch
    assert samples[("pipeserve_queue_wait_seconds_count", (model,))] >= 3
    assert samples[("pipeserve_inference_seconds_count", (model,))] >= 3
    assert samples[("pipeserve_queue_depth", (model,))] == 0
    assert samples[("pipeserve_in_flight", (model,))] == 0
    assert samples[("pipeserve_dropped_jobs_total", (model, ("reason", "disconnected")))] == 0
    assert samples[("pipeserve_refused_requests_total", (model, ("reason", "queue_full")))] == 0
    assert samples[("pipeserve_worker_up", (model, ("worker", "0")))] == 1
    assert samples[("pipeserve_worker_restarts_total", (model, ("worker", "0")))] == 0
    assert samples[("pipeserve_model_load_seconds", (model, ("worker", "0")))] > 0


def test_metrics_follow_a_worker_restart_and_need_the_key(start_server: Any) -> None:
    server = start_server(*ECHO, "--api-key", "k")
    assert server.request("GET", "/metrics").status == 401
    auth = {"Authorization": "Bearer k"}
    os.kill(int(server.request("GET", "/info", headers=auth).json()["workers"][0]["pid"]), signal.SIGKILL)

    def restarted() -> bool:
        text = server.request("GET", "/metrics", headers=auth).body.decode()
        samples = _samples(text)
        model = ("model", "custom_pipelines:make")
        return samples[("pipeserve_worker_restarts_total", (model, ("worker", "0")))] == 1 and \
            samples[("pipeserve_worker_up", (model, ("worker", "0")))] == 1

    wait_until(restarted, 60, interval=0.2, message="restart counted and worker up again")


def test_one_access_line_per_request_with_batch_size_and_request_id(start_server: Any) -> None:
    server = start_server(*ECHO)
    server.post_json({"inputs": ["a", "b"]}, headers={"X-Request-Id": "access-1"})
    server.request("GET", "/nope", headers={"X-Request-Id": "access-2"})
    line = wait_until(lambda: next((l for l in server.lines if "id=access-1" in l), None), 5,
                      message="access line")
    assert "pipeserve.access POST / 200 " in line and "batch=2" in line and "ms " in line
    missing = wait_until(lambda: next((l for l in server.lines if "id=access-2" in l), None), 5)
    assert "GET /nope 404" in missing and "batch=-" in missing


def test_json_logs_and_no_timestamps_under_the_journal(start_server: Any) -> None:
    server = start_server(*ECHO, "--log-format", "json", env={"JOURNAL_STREAM": "8:12345"})
    server.post_json({"inputs": "x"}, headers={"X-Request-Id": "json-1"})
    wait_until(lambda: any("json-1" in line for line in server.lines), 5, message="access line")
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert records and all("time" not in record for record in records)
    access = next(r for r in records if r.get("request_id") == "json-1")
    assert access["logger"] == "pipeserve.access" and access["status"] == 200
    assert access["batch_size"] == 1 and access["latency_ms"] > 0
    assert any(r["logger"] == "pipeserve.supervisor" and "ready in" in r["message"] for r in records)
    assert any(r["logger"] == "pipeserve.worker" and "loaded" in r["message"] for r in records)
    plain = [line for line in server.lines if not line.startswith("{")]
    assert not [line for line in plain if "INFO" in line], plain


def test_text_logs_are_timestamped_outside_the_journal(start_server: Any) -> None:
    server = start_server(*ECHO)
    assert server.lines[0][:4].isdigit()  # "2026-11-25 10:00:00,123 INFO ..."


# --- systemd -------------------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; collects what is sent."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []  # in the order they arrived
        self._stop = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def first(self, key: str, prefix: str = "") -> int | None:
        """The position of the first message with `key` (whose value starts with `prefix`)."""
        return next((index for index, fields in enumerate(list(self.messages))
                     if key in fields and fields[key].startswith(prefix)), None)

    def values(self, key: str) -> list[str]:
        return [fields[key] for fields in list(self.messages) if key in fields]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_status_watchdog_and_stopping(start_server: Any, tmp_path: Path,
                                                      abstract: bool) -> None:
    name = f"pipeserve-test-{os.getpid()}-{time.monotonic_ns()}"
    address = "\0" + name if abstract else str(tmp_path / "notify.sock")
    notify = NotifySocket(address)
    try:
        gate = tmp_path / "load-gate"
        env = {"NOTIFY_SOCKET": "@" + name if abstract else address, "WATCHDOG_USEC": "400000",
               "TEST_LOAD_GATE": str(gate)}
        server = start_server(*ECHO, env=env, ready=False)
        try:
            server.wait_listening()
            # Bound and held in its load: loading is reported, readiness is not.
            assert server.request("GET", "/ready").status == 503
            wait_until(lambda: notify.first("STATUS", "loading") is not None, 10, message="STATUS=loading")
            wait_until(lambda: notify.first("EXTEND_TIMEOUT_USEC") is not None, 10,
                       message="EXTEND_TIMEOUT_USEC")
            assert notify.first("READY") is None, "READY=1 before the model loaded"
        finally:
            gate.touch()
        server.wait_ready()
        wait_until(lambda: notify.first("READY") is not None, 10, message="READY=1")
        ready_at = notify.first("READY")
        assert notify.first("STATUS", "loading") < ready_at  # READY=1 only after loading, not at bind time
        assert notify.first("EXTEND_TIMEOUT_USEC") < ready_at
        assert any(s.startswith("serving") for s in notify.values("STATUS"))
        wait_until(lambda: len(notify.values("WATCHDOG")) >= 4, 5, message="watchdog pings")
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
        assert notify.values("STOPPING") == ["1"]
        assert notify.values("READY") == ["1"]
    finally:
        notify.close()


def test_socket_activation_serves_on_the_passed_socket(start_server: Any) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # What systemd does: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID = the service's own pid.
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
                "os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.execv(sys.executable, [sys.executable, '-m', 'pipeserve', *sys.argv[2:]])")
    try:
        server = start_server(*ECHO, "--port", "1", command=[sys.executable, "-c", launcher,
                                                             str(listener.fileno())],
                              pass_fds=(listener.fileno(),))
        assert server.port == port  # it serves on the passed socket, not on --port
        assert server.post_json({"inputs": "activated"}).json()["text"] == "activated"
        assert "LISTEN_FDS" not in Path(f"/proc/{server.worker_pid()}/environ").read_bytes().decode(errors="replace")
    finally:
        listener.close()


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        # CI installs it (.ci/run, Debian's systemd package): there a missing tool is a failure.
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("systemd-analyze is not installed, and CI must run this test (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    source = REPO / "deploy" / "systemd"
    for name in ("pipeserve.service", "pipeserve.socket"):
        text = (source / name).read_text()
        # verify checks that ExecStart exists: point it at this interpreter.
        (tmp_path / name).write_text(text.replace("/opt/pipeserve/.venv/bin/python", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "pipeserve.service"),
                             str(tmp_path / "pipeserve.socket")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pipeserve" not in result.stderr, result.stderr  # no warnings about our units
    unit = (source / "pipeserve.service").read_text()
    for directive in ("Type=notify", "NotifyAccess=main", "KillMode=mixed", "EnvironmentFile=",
                      "Restart=on-failure", "StartLimitBurst=", "TimeoutStartSec=", "DynamicUser=yes",
                      "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
                      "CacheDirectory=", "LoadCredential=", "WatchdogSec="):
        assert directive in unit
    assert re.search(r"^OOMPolicy=continue$", unit, re.MULTILINE)  # not commented out


def test_kubernetes_example_probes_grace_period_and_autoscaling_signal() -> None:
    import yaml

    documents = {d["kind"]: d for d in yaml.safe_load_all((REPO / "deploy/kubernetes/pipeserve.yaml").read_text())}
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # The grace period covers preStop's pause, the drain and the model process's exit grace.
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pause + float(env["PIPESERVE_DRAIN_TIMEOUT"]) + 5
    metric = documents["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == "pipeserve_queue_depth"
    from pipeserve.front.config import load_config

    load_config([], environ={k: v for k, v in env.items() if v is not None})  # every setting parses
