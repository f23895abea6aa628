"""Smaller edges found in a read of the code, each through a real server: /metrics without
`_created` series, `dimensions` refused before any forward pass, the access log's path escaped,
and images bounded by --max-image-pixels."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Server, png_bytes

ECHO = ("--pipeline", "custom_pipelines:make")
pytestmark = pytest.mark.timeout(120)


def test_metrics_have_no_created_series(start_server: Callable[..., Server]) -> None:
    server = start_server(*ECHO)
    assert server.post_json({"inputs": "x"}).status == 200
    text = server.request("GET", "/metrics").body.decode()
    assert "pipeserve_requests_total{" in text  # the counter itself is there
    assert "_created" not in text


def test_dimensions_beyond_the_embedding_size_are_refused_before_any_forward(
        start_server: Callable[..., Server], tiny_models: dict[str, Path]) -> None:
    server = start_server("--model", str(tiny_models["feature-extraction"]))
    size = len(json.loads(server.request("POST", "/v1/embeddings", json.dumps({"input": "hello"}),
                                         {"Content-Type": "application/json"}).body)["data"][0]["embedding"])
    calls = server.info()["counters"]["pipeline_calls"]
    for dimensions in (size + 1, 10 * size):
        reply = server.request("POST", "/v1/embeddings", json.dumps({"input": ["a", "b", "c"], "dimensions": dimensions}),
                               {"Content-Type": "application/json"})
        assert reply.status == 400, reply.body
        assert f"from 1 to {size}" in reply.json()["error"]["message"]
        assert reply.json()["error"]["param"] is None or reply.json()["error"]["type"]
    assert server.info()["counters"]["pipeline_calls"] == calls  # no forward pass, no bisection
    reply = server.request("POST", "/v1/embeddings", json.dumps({"input": "a", "dimensions": size}),
                           {"Content-Type": "application/json"})
    assert reply.status == 200 and len(reply.json()["data"][0]["embedding"]) == size


def test_a_newline_in_the_path_cannot_forge_an_access_line(start_server: Callable[..., Server]) -> None:
    server = start_server(*ECHO)
    reply = server.request("GET", "/nothing%0A2026-12-05%20INFO%20pipeserve.access%20GET%20/forged%20200")
    assert reply.status == 404
    line = server.wait_log("GET /nothing")
    assert "\\x0a2026-12-05 INFO" in line
    assert not any(entry.startswith("2026-12-05 INFO pipeserve.access GET /forged") for entry in server.lines)


def _declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_over_max_image_pixels_is_a_413(start_server: Callable[..., Server],
                                                  task_models: dict[str, Path]) -> None:
    server = start_server("--model", str(task_models["image-classification"]), "--max-image-pixels", "1000")
    small = server.request("POST", "/", png_bytes(30, 30), {"Content-Type": "image/png"})
    assert small.status == 200, small.body
    large = server.request("POST", "/", png_bytes(40, 30), {"Content-Type": "image/png"})
    assert large.status == 413, large.body
    assert "40x30 = 1200 pixels; at most 1000 (--max-image-pixels)" in large.json()["error"]
    # A file of a few hundred bytes that declares a huge image: refused from its header.
    bomb = server.request("POST", "/", _declared_png(20000, 20000), {"Content-Type": "image/png"})
    assert bomb.status == 413 and "20000x20000" in bomb.json()["error"]
