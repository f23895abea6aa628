"""Admission and fairness at 1, 2, 4 and 8 model processes, and the machine-derived defaults.

The rest of the suite runs one worker; the defaults give one per core (up to 4), and a request's
admission window grows with the workers. More workers than this machine's cores is fine for
correctness: the echo pipeline's calls sleep rather than compute.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, client_session, completed, counters, eventually, held_batch, input_count, post
from pipeserve.front import machine
from pipeserve.front.config import Config
from pipeserve.front.machine import (
    CPU_BATCH_TOKENS,
    CPU_MIN_BATCH_FILL,
    GPU_BATCH_TOKENS,
    GPU_MIN_BATCH_FILL,
    MAX_AUTO_WORKERS,
)
from pipeserve.front.runtime import Runtime

ECHO = ("--pipeline", "custom_pipelines:make")
MAX_QUEUE, BATCH = 64, 16
MAX_ITEMS = 2048  # --max-items' default

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", params=[1, 2, 4, 8], ids=lambda n: f"workers={n}")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    # Every call takes 20 ms: a request of --max-items inputs takes many rounds of batches.
    server = Server([*ECHO, "--max-queue", str(MAX_QUEUE), "--max-batch-size", str(BATCH)],
                    env={"PIPESERVE_WORKERS": str(request.param), "TEST_CALL_DELAY_S": "0.02"})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _texts(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def _refused(server: Server) -> int:
    return sum(counters(server)["refused"].values())


def test_the_defaults_in_force_fit_the_queue(server: Server) -> None:
    in_force = server.info()["in_force"]
    assert in_force["workers"] == len(server.info()["workers"])
    assert BATCH <= in_force["admission_window"] <= MAX_QUEUE - BATCH  # a batch of room left to others
    assert in_force["threads"] >= 1


def test_a_request_of_max_items_is_admitted_on_an_idle_server(server: Server) -> None:
    refused = _refused(server)
    texts = _texts(MAX_ITEMS, "big")
    reply = server.post_json({"inputs": texts}, timeout=120)
    assert reply.status == 200, reply.body[:300]
    assert [answer["text"] for answer in reply.json()] == texts
    assert _refused(server) == refused


def test_a_large_request_beside_steady_traffic_is_admitted_as_the_queue_drains(server: Server) -> None:
    # 20 clients with 2 inputs each keep up to 40 of the queue's 64 places taken: the large
    # request's first window may not fit whole, and must not be refused for it.
    clients, per_request = 20, 2

    async def scenario() -> tuple[Any, list[Any]]:
        async with client_session(timeout=120) as session:
            big_done = asyncio.Event()

            async def steady(client: int) -> list[Any]:
                answers = []
                for round_ in range(200):  # bounded; ends when the large request has its answer
                    if big_done.is_set():
                        break
                    answers.append(await post(session, server, {"inputs": _texts(per_request, f"s{client}.{round_}.")}))
                return answers

            traffic = [asyncio.ensure_future(steady(client)) for client in range(clients)]
            await eventually(lambda: counters(server)["items"] > 0, message="steady traffic served")
            big = await post(session, server, {"inputs": _texts(1000, "big")})
            big_done.set()
            return big, [answer for answers in await asyncio.gather(*traffic) for answer in answers]

    big, steady_answers = asyncio.run(scenario())
    assert big.status == 200, big.body
    assert [answer["text"] for answer in big.body] == _texts(1000, "big")
    # The steady clients compete for the same queue: some are refused at once while it is full.
    assert steady_answers and 200 in {answer.status for answer in steady_answers}
    assert all(answer.status == 200 or (answer.status == 503 and "queue is full" in answer.body["error"])
               for answer in steady_answers)


def test_a_small_request_is_not_held_behind_a_large_one(server: Server) -> None:
    async def scenario() -> tuple[Any, Any, bool]:
        async with client_session(timeout=120) as session:
            big = asyncio.ensure_future(post(session, server, {"inputs": _texts(MAX_ITEMS, "big")}))
            before = counters(server)["items"]
            await eventually(lambda: counters(server)["items"] > before + BATCH, message="the large request running")
            small = await post(session, server, {"inputs": "small"})
            big_was_running = not big.done()
            return small, await big, big_was_running

    small, big, big_was_running = asyncio.run(scenario())
    assert small.status == 200 and big.status == 200
    # The small request waited behind one window of the large one, not behind all of it.
    assert big_was_running


def test_a_burst_beyond_the_queue_is_refused_at_once_with_every_worker_held(server: Server, tmp_path: Path) -> None:
    workers = server.info()["in_force"]["workers"]
    burst = 200
    # One held input per worker: different parameters never share a batch.
    holds = [{"inputs": f"WAIT:{tmp_path / 'gate'}", "parameters": {"suffix": str(i)}} for i in range(workers)]

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        async with client_session() as session, held_batch(session, server, tmp_path / "gate",
                                                           documents=holds) as held:
            assert counters(server)["in_flight"] == input_count(holds)
            tasks = [asyncio.ensure_future(post(session, server, {"inputs": f"b{i}"})) for i in range(burst)]
            refused = [task.result() for task in await completed(tasks, burst - MAX_QUEUE)]
            held.release()
            return refused, list(await asyncio.gather(*tasks)), held.answers

    refused, answers, held_answers = asyncio.run(scenario())
    assert {answer.status for answer in held_answers} == {200}
    assert len(refused) == burst - MAX_QUEUE and {answer.status for answer in refused} == {503}
    assert all("queue is full" in answer.body["error"] for answer in refused)
    assert [answer.status for answer in answers].count(200) == MAX_QUEUE


# --- the defaults, on machines of other shapes ---------------------------------------------------


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("generator", [False, True])
def test_cpu_defaults_for_every_core_count(monkeypatch: pytest.MonkeyPatch, cores: int, generator: bool) -> None:
    monkeypatch.setattr("pipeserve.front.machine.cores", lambda: cores)
    monkeypatch.setattr("pipeserve.front.machine.NVIDIA_DEVICE_PRESENT", False)
    config = Config(device="auto", task="text-generation" if generator else None)
    workers = 1 if generator else min(cores, MAX_AUTO_WORKERS)
    assert config.worker_count() == workers
    assert config.torch_threads() == max(1, cores // workers)
    assert config.worker_count() * config.torch_threads() <= max(cores, workers)  # never oversubscribed
    assert config.batch_tokens() == CPU_BATCH_TOKENS and config.batch_fill() == CPU_MIN_BATCH_FILL
    assert config.max_batch_size <= config.admission_window() <= config.max_queue - config.queue_reserve()
    assert config.derived()["gpu"] is False


@pytest.mark.parametrize(("nodes", "present"), [
    (["nvidia0", "nvidiactl", "nvidia-uvm"], True),
    (["nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"], True),  # a pod given GPU 3 alone
    (["nvidiactl", "nvidia-uvm", "nvidia-modeset"], False),  # the driver's nodes, no GPU's
    ([], False),
])
def test_a_gpu_is_any_nvidia_device_node(tmp_path: Path, nodes: list[str], present: bool) -> None:
    for node in nodes:
        (tmp_path / node).touch()
    assert machine.nvidia_device_present(str(tmp_path)) is present
    assert machine.nvidia_device_present(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(("given", "hidden"), [(None, False), ("", True), ("-1", True), (" -1 ", True),
                                               ("0", False), ("GPU-5e1f", False)])
def test_gpus_hidden_by_cuda_visible_devices_are_no_gpu(given: str | None, hidden: bool) -> None:
    # A job kept off the GPUs on a GPU machine: `--device auto` would start one worker with every
    # core's threads, sized for a GPU it will not get.
    assert machine.gpus_hidden({} if given is None else {"CUDA_VISIBLE_DEVICES": given}) is hidden


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:1"])
def test_gpu_defaults_for_every_core_count(monkeypatch: pytest.MonkeyPatch, cores: int, device: str) -> None:
    monkeypatch.setattr("pipeserve.front.machine.cores", lambda: cores)
    monkeypatch.setattr("pipeserve.front.machine.NVIDIA_DEVICE_PRESENT", True)
    config = Config(device=device)
    assert config.worker_count() == 1 and config.torch_threads() == cores
    assert config.batch_tokens() == GPU_BATCH_TOKENS and config.batch_fill() == GPU_MIN_BATCH_FILL
    assert config.max_batch_size <= config.admission_window() <= config.max_queue - config.queue_reserve()


def test_several_gpus_and_explicit_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeserve.front.machine.cores", lambda: 64)
    config = Config(devices=("cuda:0", "cuda:1", "cuda:2", "cuda:3"), max_batch_size=64)
    assert config.worker_count() == 4 and config.torch_threads() == 16
    assert config.admission_window() == config.max_queue - 64  # 2 x 64 x 4 would be 512: capped, a batch left
    explicit = Config(device="cuda", min_batch_fill=0.5, max_batch_tokens=1000)
    assert explicit.batch_fill() == 0.5 and explicit.batch_tokens() == 1000
    assert Config(device="cpu", min_batch_fill=0.0).batch_fill() == 0.0  # 0 is a value, not "auto"


def _cgroup_tree(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[str, str]:
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(membership)
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


@pytest.mark.parametrize(("membership", "files", "quota"), [
    # a container limited to 2.5 CPUs (cgroup v2, its own cgroup at the namespace's root)
    ("0::/\n", {"cpu.max": "250000 100000\n"}, 2.5),
    # a systemd service with CPUQuota=150% inside an unlimited slice
    ("0::/system.slice/pipeserve.service\n", {"cpu.max": "max 100000\n", "system.slice/cpu.max": "max 100000\n",
                                               "system.slice/pipeserve.service/cpu.max": "150000 100000\n"}, 1.5),
    # a parent's limit applies to its children too
    ("0::/pod/container\n", {"pod/cpu.max": "100000 100000\n", "pod/container/cpu.max": "400000 100000\n"}, 1.0),
    # cgroup v1 (cpu,cpuacct hierarchy): quota and period in two files
    ("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                                                  "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 3.0),
    # cgroup v1 with the hierarchy mounted as "cpu" alone
    ("3:cpu,cpuacct:/kubepods/pod1\n", {"cpu/kubepods/pod1/cpu.cfs_quota_us": "50000\n",
                                        "cpu/kubepods/pod1/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("1:name=systemd:/\n0::/\n", {"cpu.max": "max 100000\n"}, None),  # no limit
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/\n", {}, None),  # no cpu controller files at all
])
def test_a_cgroup_cpu_quota_is_read(tmp_path: Path, membership: str, files: dict[str, str],
                                    quota: float | None) -> None:
    from pipeserve.front.machine import cgroup_cpu_quota

    root, cgroup = _cgroup_tree(tmp_path, membership, files)
    assert cgroup_cpu_quota(root, cgroup) == quota


def test_cores_are_lowered_to_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeserve.front import machine

    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(machine, "CGROUP_CPU_QUOTA", 2.5)
    assert machine.cores() == 3  # 2.5 CPUs' worth of time: 3 threads can use it
    assert Config(device="cpu").worker_count() == 3 and Config(device="cpu").torch_threads() == 1


@pytest.mark.parametrize(("guessed_gpu", "device"), [(True, "cpu"), (False, "cuda:0")])
async def test_batch_defaults_follow_the_device_a_model_process_reports(
        monkeypatch: pytest.MonkeyPatch, guessed_gpu: bool, device: str) -> None:
    """The front guesses a GPU from /dev/nvidiaN; the first Ready says where the model runs."""
    monkeypatch.setattr(machine, "NVIDIA_DEVICE_PRESENT", guessed_gpu)
    runtime = Runtime(Config(device="auto", pipeline="m:f"))
    assert runtime.batcher.max_batch_tokens == (GPU_BATCH_TOKENS if guessed_gpu else CPU_BATCH_TOKENS)
    runtime.device_known(device)
    gpu = device.startswith("cuda")
    assert runtime.batcher.max_batch_tokens == (GPU_BATCH_TOKENS if gpu else CPU_BATCH_TOKENS)
    assert runtime.batcher.min_batch_fill == (GPU_MIN_BATCH_FILL if gpu else CPU_MIN_BATCH_FILL)
    assert runtime.info()["in_force"]["gpu"] is gpu
    explicit = Runtime(Config(device="auto", pipeline="m:f", max_batch_tokens=1000, min_batch_fill=0.5))
    explicit.device_known(device)
    assert (explicit.batcher.max_batch_tokens, explicit.batcher.min_batch_fill) == (1000, 0.5)


def test_a_request_of_many_windows_finishes_across_a_sigterm_drain(start_server: Any) -> None:
    server = start_server(*ECHO, "--max-queue", str(MAX_QUEUE), "--max-batch-size", str(BATCH),
                          env={"TEST_CALL_DELAY_S": "0.02"})
    texts = _texts(MAX_ITEMS, "drained")

    async def scenario() -> Any:
        async with client_session(timeout=120) as session:
            big = asyncio.ensure_future(post(session, server, {"inputs": texts}))
            await eventually(lambda: counters(server)["items"] > 2 * BATCH, message="the request running")
            server.signal(signal.SIGTERM)
            return await big

    answer = asyncio.run(scenario())
    assert answer.status == 200, answer.body
    assert [item["text"] for item in answer.body] == texts  # every window, the later ones included
    assert server.wait_exit(60) == 0
