"""Two pipeserve replicas behind the shipped nginx configuration (Debian's nginx, on loopback)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import REPO_ROOT, Server, post_json, request, wait_until

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
ECHO = ("--pipeline", "custom_pipelines:make")


@pytest.fixture(autouse=True)
def nginx_installed() -> None:
    """CI installs nginx (.ci/run): there a missing nginx fails these tests; elsewhere they skip."""
    if NGINX is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("nginx is not installed, and CI must run this test (apt-get install nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Nginx:
    """The shipped deploy/nginx/pipeserve.conf, pointed at this test's replicas."""

    def __init__(self, folder: Path, replica_ports: list[int]) -> None:
        self.port = _free_port()
        site = (REPO_ROOT / "deploy" / "nginx" / "pipeserve.conf").read_text()
        site = site.replace("127.0.0.1:8001", f"127.0.0.1:{replica_ports[0]}")
        site = site.replace("127.0.0.1:8002", f"127.0.0.1:{replica_ports[1]}")
        site = site.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{self.port};")
        (folder / "pipeserve.conf").write_text(site)
        temp = folder / "temp"
        temp.mkdir()
        (folder / "nginx.conf").write_text(f"""
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {folder}/pipeserve.conf;
}}
""")
        self.process = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        wait_until(self._listening, 10, message="nginx listening")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"nginx exited: {self.process.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


class Traffic:
    """Clients posting through nginx one request after another until stopped; each phase of a
    scenario waits, response by response, for what it needs to have seen (`until`)."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.statuses: Counter[int] = Counter()
        self.served_by: Counter[int] = Counter()  # 200s by the pid of the worker that answered
        self._port = port
        self._stop = asyncio.Event()
        self._answered = asyncio.Condition()
        self._task = asyncio.ensure_future(asyncio.gather(*(self._client(i) for i in range(clients))))

    async def _client(self, index: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            sequence = 0
            while not self._stop.is_set():
                sequence += 1
                async with session.post(f"http://127.0.0.1:{self._port}/",
                                        json={"inputs": f"c{index}-{sequence}"}) as response:
                    self.statuses[response.status] += 1
                    if response.status == 200:
                        self.served_by[(await response.json())["pid"]] += 1
                async with self._answered:
                    self._answered.notify_all()

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Return once `predicate` holds after a response; fail after `timeout` or if a client failed."""
        try:
            async with asyncio.timeout(timeout), self._answered:
                await self._answered.wait_for(lambda: self._task.done() or predicate())
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; clients saw "
                                 f"{dict(self.statuses)}, served by {dict(self.served_by)}") from None
        if self._task.done():
            self._task.result()  # a client's exception, raised here
            raise AssertionError(f"the clients stopped while waiting for {what}")

    async def stop(self) -> None:
        self._stop.set()
        await self._task


def test_replicas_behind_nginx_survive_a_worker_crash_and_a_dead_replica(
        start_server: Any, tmp_path: Path) -> None:
    replicas: list[Server] = [start_server(*ECHO, env={"TEST_CALL_DELAY_S": "0.05"}) for _ in range(2)]
    nginx = Nginx(tmp_path, [replica.port for replica in replicas])
    first_pids = [replica.worker_pid() for replica in replicas]
    error_log = tmp_path / "error.log"

    def nginx_errors(since: int = 0) -> str:
        return error_log.read_bytes()[since:].decode(errors="replace") if error_log.exists() else ""

    async def scenario() -> Traffic:
        traffic = Traffic(nginx.port)
        served_by = traffic.served_by
        try:
            await traffic.until(lambda: all(served_by[pid] >= 30 for pid in first_pids), "both replicas serving")
            # 1. One replica's model process dies under load: its batch answers 503, nginx retries.
            os.kill(first_pids[0], signal.SIGKILL)
            await traffic.until(lambda: "died: killed by SIGKILL" in replicas[0].log, "the worker's death logged")
            await asyncio.to_thread(replicas[0].wait_ready, 60)
            restarted = await asyncio.to_thread(replicas[0].worker_pid)
            # nginx takes the replica back once its fail_timeout has passed: the new worker serves.
            await traffic.until(lambda: served_by[restarted] >= 30, "the restarted worker serving through nginx")
            # 2. A whole replica dies (front and worker): nginx's tries of it fail (its error log
            # names the dead upstream) and those requests fail over to the other.
            errors_before, served_before = len(nginx_errors()), served_by[restarted]
            os.killpg(replicas[1].process.pid, signal.SIGKILL)
            dead_upstream = f'upstream: "http://127.0.0.1:{replicas[1].port}/'
            await traffic.until(lambda: dead_upstream in nginx_errors(errors_before)
                                and served_by[restarted] >= served_before + 30,
                                "requests failed over from the dead replica")
        finally:
            await traffic.stop()
        return traffic

    try:
        traffic = asyncio.run(scenario())
    finally:
        nginx.stop()
    assert traffic.statuses[200] > 100
    assert set(traffic.statuses) == {200}, f"clients saw {dict(traffic.statuses)}; nginx retries should hide one failure"
    assert "died: killed by SIGKILL" in replicas[0].log
    assert len(traffic.served_by) >= 3  # replica 0's first and restarted worker, and replica 1's


def test_nginx_config_answers_pipeserve_errors_as_json(start_server: Any, tmp_path: Path) -> None:
    replicas = [start_server(*ECHO) for _ in range(2)]
    nginx = Nginx(tmp_path, [replica.port for replica in replicas])
    try:
        bad = post_json(nginx.port, {"inputs": 42})
        assert bad.status == 400 and "must be a string" in bad.json()["error"]  # a 4xx is not retried
        assert request(nginx.port, "GET", "/ready").status == 200
    finally:
        nginx.stop()


@pytest.mark.timeout(30)
def test_nginx_drops_idle_upstream_connections_before_pipeserve_does() -> None:
    """A request nginx sends on a connection pipeserve is closing fails, and with max_fails=1
    marks a healthy replica down: nginx's idle timeout must be the shorter."""
    import re

    from pipeserve.front.config import Config

    site = (REPO_ROOT / "deploy" / "nginx" / "pipeserve.conf").read_text()
    upstream = site.split("upstream pipeserve {", 1)[1].split("}", 1)[0]
    idle = re.search(r"^\s*keepalive_timeout\s+(\d+)s;", upstream, re.MULTILINE)
    assert idle is not None, "the upstream block sets no keepalive_timeout (nginx's default is 60 s)"
    assert float(idle.group(1)) < Config().keepalive_timeout
