"""A seconds-long smoke run of the benchmark's load generator against a real server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import loadgen
from workload import make_texts


def test_workload_is_seeded_and_mixed() -> None:
    texts = make_texts(1000)
    assert texts == make_texts(1000)
    words = [len(text.split()) for text in texts]
    assert min(words) >= 5 and max(words) <= 120
    assert 0.4 < sum(w <= 20 for w in words) / len(words) < 0.6


def test_closed_and_open_loops_measure_a_real_server(start_server: Any) -> None:
    server = start_server("--pipeline", "custom_pipelines:make")
    closed = asyncio.run(loadgen.closed_loop(server.port, clients=4, duration=1.0, warmup=0.2))
    assert closed.counts.get("200", 0) > 10 and closed.requests_per_s > 10
    assert 0 < closed.p50_ms <= closed.p99_ms
    opened = asyncio.run(loadgen.open_loop(server.port, rate=50, duration=1.0, warmup=0.2))
    assert set(opened.counts) == {"200"} and 20 < opened.counts["200"] < 100


def test_the_gpu_bench_carries_every_requirement_its_machine_lacks() -> None:
    """bench/gpu.py installs on the lent GPU machine what its image lacks: every requirement of
    setup.cfg is either in that image or in the wheels it carries (msgspec, once, was neither)."""
    import ast
    import configparser
    import re

    root = Path(__file__).resolve().parents[1]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    required = {re.split(r"[<>=!~\s\[;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
                for line in setup["options"]["install_requires"].splitlines()
                if line.strip() and not line.strip().startswith("#")}
    literals = {node.targets[0].id: ast.literal_eval(node.value)
                for node in ast.parse((root / "bench" / "gpu.py").read_text()).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("WHEELS_COMMON", "ON_THE_MACHINE")}
    carried = {pin.split("==")[0].lower().replace("_", "-") for pin in literals["WHEELS_COMMON"]}
    assert {"aiohttp", "torch", "msgspec"} <= required
    assert required - carried - literals["ON_THE_MACHINE"] == set()
