"""GET /openapi.json describes exactly what this server serves, and schemathesis, with every
check (negative data included: what the document forbids must be refused with a 4xx, and what
it allows must be accepted), finds nothing against a live server of each kind of task."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server, _bert_with_labels
from test_streaming import chat_model  # noqa: F401  (a fixture)


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
                if route.documented and route.refusal(None, "feature-extraction") is None}
    assert described == declared
    assert ("GET", "/") not in described  # the page is for browsers: not an API operation
    embeddings = document["paths"]["/v1/embeddings"]["post"]
    assert embeddings["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"}
    request = document["components"]["schemas"]["EmbeddingsRequest"]
    assert "input" in request["required"] and request["additionalProperties"] is False
    # The served model's own bounds and names are filled in: the tiny BERT's 32 dimensions, no prompts.
    embed = document["components"]["schemas"]["EmbedRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 32} in embed["dimensions"]["anyOf"]
    assert "prompt_name" not in embed
    model = document["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["schema"]
    assert model["enum"] == ["feature-extraction"]
    assert "x-pipeserve-fact" not in json.dumps(document)


def _fuzz(server: Server, examples: int = 25) -> str:
    """schemathesis with every check against the server's own document; its report."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a test dependency"
    result = subprocess.run(
        [st, "run", f"http://127.0.0.1:{server.port}/openapi.json", "--checks", "all",
         "--max-examples", str(examples), "--workers", "1", "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=400)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "failed" not in result.stdout, report
    for warning in ("mismatch", "Health check", "WARNING", "Warning"):
        assert warning not in result.stdout, report
    assert server.request("GET", "/ready").status == 200  # still serving afterwards
    return result.stdout


def test_fuzzing_an_embedder_finds_nothing(embedding_server: Server) -> None:
    _fuzz(embedding_server)


@pytest.mark.parametrize("labels", [["NEGATIVE", "POSITIVE"], ["score"]], ids=["classifier", "reranker"])
def test_fuzzing_a_classifier_finds_nothing(labels: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    model = _bert_with_labels(tmp_path_factory.mktemp("classifier") / "model", labels, "sequence")
    server = Server(["--model", str(model)]).wait_ready()
    try:
        paths = set(server.request("GET", "/openapi.json").json()["paths"])
        assert ("/rerank" in paths) == (len(labels) == 1)  # only a reranker lists it
        _fuzz(server)
    finally:
        server.stop()


def test_fuzzing_a_chat_generator_finds_nothing(chat_model: Path) -> None:  # noqa: F811
    # A few new tokens at most (the document says so), so that each of the fuzzer's requests is short.
    server = Server(["--model", str(chat_model), "--max-new-tokens", "8"]).wait_ready()
    try:
        document = server.request("GET", "/openapi.json").json()
        parameters = document["components"]["schemas"]["Parameters"]["properties"]
        assert {"type": "integer", "minimum": 1, "maximum": 8} in parameters["max_new_tokens"]["anyOf"]
        stream = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
        assert set(stream) == {"application/json", "text/event-stream"}
        # A rule across fields is in the document too: streamed, POST / takes one prompt.
        assert "anyOf" in document["components"]["schemas"]["RootRequest"]
        refused = server.request("POST", "/", json.dumps({"inputs": ["a", "b"], "stream": True}),
                                 {"Content-Type": "application/json"})
        assert refused.status == 400 and "one prompt" in refused.json()["error"]
        _fuzz(server)
    finally:
        server.stop()


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
        # No chat template: chat completions are not listed (and answer a 400 saying why).
        assert listed >= GENERATION_ONLY - {"/v1/chat/completions"} and "/v1/chat/completions" not in listed
        assert not (EMBEDDING_ONLY | CLASSIFICATION_ONLY) & listed
        reply = generator.request("POST", "/v1/embeddings", '{"input": "x"}', {"Content-Type": "application/json"})
        assert reply.status == 400 and "needs a feature-extraction model" in reply.json()["error"]["message"]
    finally:
        generator.stop()
