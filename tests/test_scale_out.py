"""Two pipeserve replicas behind the shipped nginx configuration (Debian's nginx, on loopback)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import REPO_ROOT, Server, post_json, request, wait_until

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
ECHO = ("--pipeline", "custom_pipelines:make")


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


def test_replicas_behind_nginx_survive_a_worker_crash_and_a_dead_replica(
        start_server: Any, tmp_path: Path) -> None:
    replicas: list[Server] = [start_server(*ECHO, env={"TEST_CALL_DELAY_S": "0.05"}) for _ in range(2)]
    nginx = Nginx(tmp_path, [replica.port for replica in replicas])
    statuses: Counter[int] = Counter()
    served_by: Counter[int] = Counter()

    async def load(stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async def client(index: int) -> None:
                sequence = 0
                while not stop.is_set():
                    sequence += 1
                    async with session.post(f"http://127.0.0.1:{nginx.port}/",
                                            json={"inputs": f"c{index}-{sequence}"}) as response:
                        statuses[response.status] += 1
                        if response.status == 200:
                            served_by[(await response.json())["pid"]] += 1

            await asyncio.gather(*(client(i) for i in range(8)))

    async def scenario() -> None:
        stop = asyncio.Event()
        traffic = asyncio.ensure_future(load(stop))
        await asyncio.sleep(1.0)
        # 1. One replica's model process dies under load: its batch answers 503, nginx retries.
        os.kill(replicas[0].worker_pid(), signal.SIGKILL)
        await asyncio.to_thread(wait_until, lambda: "died: killed by SIGKILL" in replicas[0].log, 10)
        await asyncio.to_thread(replicas[0].wait_ready, 60)
        await asyncio.sleep(2.5)  # past nginx's fail_timeout, so both replicas take traffic again
        # 2. A whole replica dies (front and worker): connections fail over to the other.
        os.killpg(replicas[1].process.pid, signal.SIGKILL)
        await asyncio.sleep(2.0)
        stop.set()
        await traffic

    try:
        asyncio.run(scenario())
    finally:
        nginx.stop()
    assert statuses[200] > 100
    assert set(statuses) == {200}, f"clients saw {dict(statuses)}; nginx retries should hide one failure"
    assert "died: killed by SIGKILL" in replicas[0].log
    assert len(served_by) >= 3  # replica 0's first and restarted worker, and replica 1's


def test_nginx_config_answers_pipeserve_errors_as_json(start_server: Any, tmp_path: Path) -> None:
    replicas = [start_server(*ECHO) for _ in range(2)]
    nginx = Nginx(tmp_path, [replica.port for replica in replicas])
    try:
        bad = post_json(nginx.port, {"inputs": 42})
        assert bad.status == 400 and "must be a string" in bad.json()["error"]  # a 4xx is not retried
        assert request(nginx.port, "GET", "/ready").status == 200
    finally:
        nginx.stop()
