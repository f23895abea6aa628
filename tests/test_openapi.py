"""GET /openapi.json describes every route the server registers, and schemathesis finds no
5xx and no response that breaks the description, against a live server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


@pytest.fixture(scope="module")
def embedding_server(tiny_models: dict[str, Path]) -> Iterator[Server]:
    server = Server(["--model", str(tiny_models["feature-extraction"])])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_the_document_lists_exactly_the_registered_routes(embedding_server: Server) -> None:
    from pipeserve.http import ROUTES

    document = embedding_server.request("GET", "/openapi.json").json()
    assert document["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    declared = {(route.method, route.path.replace("{model:.+}", "{model}")) for route in ROUTES
                if route.documented and route.serves("feature-extraction")}
    assert described == declared
    assert ("GET", "/") not in described  # the page is for browsers: not an API operation
    embeddings = document["paths"]["/v1/embeddings"]["post"]
    assert embeddings["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"}
    assert "input" in embeddings["requestBody"]["content"]["application/json"]["schema"]["required"]


def test_schemathesis_finds_no_server_error_and_no_nonconforming_response(embedding_server: Server) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a test dependency"
    result = subprocess.run(
        [st, "run", f"http://127.0.0.1:{embedding_server.port}/openapi.json", "--checks", CHECKS,
         "--max-examples", "25", "--workers", "1", "--seed", "1", "--no-color",
         "--suppress-health-check", "filter_too_much"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    assert embedding_server.request("GET", "/ready").status == 200  # still serving afterwards


def test_the_readme_documents_every_route() -> None:
    from conftest import REPO_ROOT
    from pipeserve.http import ROUTES

    readme = (REPO_ROOT / "README.md").read_text()
    for route in ROUTES:
        path = route.path.replace("{model:.+}", "{model}")
        assert f"`{route.method} {path}`" in readme, f"{route.method} {path}"


GENERATION_ONLY = {"/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"}
EMBEDDING_ONLY = {"/embed", "/embed_all", "/v1/embeddings"}
CLASSIFICATION_ONLY = {"/predict", "/rerank"}


def test_the_document_lists_only_the_routes_the_model_serves(embedding_server: Server,
                                                             task_models: dict[str, Path]) -> None:
    embedder = set(embedding_server.request("GET", "/openapi.json").json()["paths"])
    assert embedder >= EMBEDDING_ONLY and not (GENERATION_ONLY | CLASSIFICATION_ONLY) & embedder
    assert {"/", "/tokenize", "/decode", "/v1/models", "/info"} <= embedder
    # A route that is not listed still answers with a clear 400 in its own envelope.
    reply = embedding_server.request("POST", "/generate", '{"inputs": "x"}', {"Content-Type": "application/json"})
    assert reply.status == 400 and "needs a text-generation model" in reply.json()["error"]
    generator = Server(["--model", str(task_models["text-generation"])]).wait_ready()
    try:
        listed = set(generator.request("GET", "/openapi.json").json()["paths"])
        assert listed >= GENERATION_ONLY and not (EMBEDDING_ONLY | CLASSIFICATION_ONLY) & listed
        reply = generator.request("POST", "/v1/embeddings", '{"input": "x"}', {"Content-Type": "application/json"})
        assert reply.status == 400 and "needs a feature-extraction model" in reply.json()["error"]["message"]
    finally:
        generator.stop()
