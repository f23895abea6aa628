"""Settings parsing and the pipe protocol, in-process, plus the CLI's usage errors for real."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import multiprocess
import numpy as np
import pytest

from pipeserve import ipc
from pipeserve.front.config import (
    Config,
    build_parser,
    env_name,
    flag_name,
    load_config,
    parse_size,
)
from pipeserve.front.machine import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, MAX_AUTO_WORKERS, cores, gpu_likely


def test_defaults() -> None:
    config = load_config([], environ={})
    assert (config.model, config.task, config.pipeline, config.served_model_name) == (None, None, None, None)
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert (config.device, config.devices, config.dtype) == ("auto", None, "auto")
    assert (config.max_batch_size, config.max_batch_delay_ms, config.max_batch_tokens) == (32, 0.0, 0)
    assert (config.batch_order, config.min_batch_fill) == ("length", None)  # None: the device decides
    assert (config.max_queue, config.max_queue_wait_ms) == (128, None)
    assert (config.request_timeout, config.generation_timeout, config.batch_timeout, config.drain_timeout) == (
        30.0, 600.0, 120.0, 30.0)
    assert (config.load_timeout, config.max_restarts, config.restart_window) == (600.0, 5, 60.0)
    assert config.max_worker_memory is None
    assert (config.max_body_bytes, config.max_items, config.max_input_bytes) == (16 << 20, 2048, 256 << 10)
    assert (config.api_key, config.api_key_file) == (None, None)
    assert (config.workers, config.threads) == (0, 0)
    expected_workers = 1 if gpu_likely("auto") else min(cores(), MAX_AUTO_WORKERS)
    assert config.worker_count() == expected_workers
    assert config.torch_threads() == max(1, cores() // expected_workers)
    assert (config.log_format, config.log_level) == ("text", "info")


def test_auto_workers_are_one_per_core_on_a_cpu_and_one_on_a_gpu() -> None:
    cpu = load_config(["--device", "cpu"], environ={})
    assert cpu.worker_count() == min(cores(), MAX_AUTO_WORKERS) and cpu.torch_threads() >= 1
    assert load_config(["--device", "cuda:0"], environ={}).worker_count() == 1
    assert load_config(["--device", "cpu", "--workers", "3"], environ={}).worker_count() == 3


def test_auto_workers_give_a_text_generator_one_process_with_every_core(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    generator = load_config(["--device", "cpu", "--model", str(tmp_path)], environ={})
    assert generator.worker_count() == 1 and generator.torch_threads() == cores()
    assert load_config(["--device", "cpu", "--task", "text-generation"], environ={}).worker_count() == 1
    classifier = load_config(["--device", "cpu", "--model", str(tmp_path), "--task", "fill-mask"], environ={})
    assert classifier.worker_count() == min(cores(), MAX_AUTO_WORKERS)
    assert load_config(["--device", "cpu", "--workers", "2", "--model", str(tmp_path)], environ={}).worker_count() == 2


def test_flag_wins_over_environment_which_wins_over_default() -> None:
    environ = {"PIPESERVE_MAX_BATCH_SIZE": "16", "PIPESERVE_PORT": "9000"}
    config = load_config(["--max-batch-size", "8"], environ=environ)
    assert config.max_batch_size == 8 and config.port == 9000


def test_every_setting_has_a_flag_a_variable_and_help() -> None:
    help_text = build_parser().format_help()
    for field in dataclasses.fields(Config):
        assert flag_name(field.name) in help_text
        assert env_name(field.name) in help_text


@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("512M", 512 << 20), ("1k", 1024),
                                            ("100", 100), ("1.5GiB", 3 << 29)])
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("argv, env, fragment", [
    (["--port", "abc"], {}, "--port: must be an integer"),
    (["--max-batch-size", "0"], {}, "must be an integer >= 1"),
    (["--device", "tpu"], {}, "must be auto, cpu, cuda or cuda:N"),
    (["--dtype", "int4"], {}, "must be one of"),
    (["--max-worker-memory", "lots"], {}, "must be a size"),
    (["--pipeline", "nocolon"], {}, "module:function"),
    ([], {"PIPESERVE_REQUEST_TIMEOUT": "-1"}, "PIPESERVE_REQUEST_TIMEOUT: must be a finite number"),
    (["--no-such-flag"], {}, "unrecognized arguments"),
])
def test_invalid_values_are_one_line_and_exit_2(argv: list[str], env: dict[str, str], fragment: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeserve", *argv], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeserve: error:") and fragment in lines[0]


def test_help_explains_each_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeserve", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "--max-batch-delay-ms" in result.stdout and "PIPESERVE_<FLAG>" in result.stdout
    # argparse formats each flag's help with %: a bare "% s" there printed argparse's own dict.
    assert "option_strings" not in result.stdout


def test_public_message_strips_paths_and_tracebacks() -> None:
    text = "cannot open /srv/models/x/weights.bin\nTraceback (most recent call last): ..."
    assert ipc.public_message(text) == "cannot open <path>"


# --- the pipe protocol ---------------------------------------------------------------------------


async def test_asyncio_side_speaks_the_multiprocess_connection_framing() -> None:
    ours, theirs = multiprocess.Pipe(duplex=True)
    sock = socket.socket(fileno=os.dup(ours.fileno()))
    ours.close()
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    big = np.arange(300_000, dtype=np.float32)  # > 64 KiB: several socket writes

    def echo_back() -> None:  # the model process's side: a blocking Connection
        message = ipc.decode(theirs.recv_bytes())
        theirs.send_bytes(ipc.encode(ipc.BatchResult(message.batch_id, [ipc.Ok(message.inputs[0])],
                                                     0.1, 1)))

    thread = threading.Thread(target=echo_back)
    thread.start()
    await ipc.write_message(writer, ipc.Batch(7, [big], {"top_k": 2}, ["r1"]))
    result = await asyncio.wait_for(ipc.read_message(reader), 10)
    thread.join(10)
    assert result.batch_id == 7
    assert np.array_equal(result.outcomes[0].value, big)
    writer.close()
    theirs.close()


def test_only_protocol_messages_cross_the_pipe() -> None:
    with pytest.raises(ipc.ProtocolError):
        ipc.encode({"not": "a message"})
    import pickle

    with pytest.raises(ipc.ProtocolError):
        ipc.decode(pickle.dumps(("a", "tuple")))


def test_a_custom_pipeline_needs_no_default_model() -> None:
    from pipeserve.front.runtime import Runtime

    runtime = Runtime(load_config(["--pipeline", "custom_pipelines:make"], environ={}))
    assert runtime.model == "" and runtime.supervisors[0].spec.model == ""


def test_devices_start_one_worker_each_and_hide_the_other_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeserve.front.supervisor import worker_spec

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = load_config(["--devices", "cuda:0,cuda:1"], environ={})
    assert config.worker_count() == 2 and config.worker_device(1) == "cuda:1"
    spec = worker_spec(config, "m", 1)
    assert (spec.device, spec.visible_devices) == ("cuda:0", "1")
    cpu = worker_spec(load_config(["--devices", "cpu,cpu"], environ={}), "m", 0)
    assert (cpu.device, cpu.visible_devices) == ("cpu", None)
    # Given GPUs by a scheduler (Slurm, a container runtime): cuda:1 is the second of those, as
    # torch numbers them, not the machine's GPU 1.
    given = {"CUDA_VISIBLE_DEVICES": "GPU-5e1f,GPU-77a0"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", given["CUDA_VISIBLE_DEVICES"])
    assert worker_spec(load_config(["--devices", "cuda:0,cuda:1"], environ=given), "m", 1).visible_devices == "GPU-77a0"
    from pipeserve.front.config import ConfigError
    from pipeserve.front.deployment import load_deployment

    with pytest.raises(ConfigError, match="cuda:2 is not among the 2 GPUs"):
        load_deployment(["--devices", "cuda:0,cuda:2"], environ=given)
    with pytest.raises(ConfigError, match="cuda:0 is not among the 0 GPUs"):  # hidden: none given
        load_deployment(["--devices", "cuda:0"], environ={"CUDA_VISIBLE_DEVICES": "-1"})


@pytest.mark.parametrize("argv, fragment", [
    (["--devices", "cuda:0,tpu"], "must be auto, cpu, cuda or cuda:N"),
    (["--devices", "auto,cpu"], "not auto"),
    (["--devices", "cpu,cpu", "--workers", "3"], "contradicts --devices"),
])
def test_bad_device_lists_are_usage_errors(argv: list[str], fragment: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeserve", *argv], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and fragment in result.stderr


def test_batch_tokens_default_by_device_and_the_flag_wins() -> None:
    assert load_config(["--device", "cpu"], environ={}).batch_tokens() == CPU_BATCH_TOKENS == 768
    assert load_config(["--device", "cuda:1"], environ={}).batch_tokens() == GPU_BATCH_TOKENS == 8192
    # One GPU among the model processes: the shared queue forms batches for it too.
    assert load_config(["--devices", "cpu,cuda:0"], environ={}).batch_tokens() == GPU_BATCH_TOKENS
    assert load_config(["--device", "cuda", "--max-batch-tokens", "300"], environ={}).batch_tokens() == 300
    assert load_config(["--device", "cpu"], environ={"PIPESERVE_MAX_BATCH_TOKENS": "2000"}).batch_tokens() == 2000
