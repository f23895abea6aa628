"""The Hugging Face Inference API dialect: `POST /` with a raw body or `{"inputs", "parameters"}`.

Answers in the shape the Inference API gives for each task, as huggingface_hub's
InferenceClient parses it (the model process shapes each task's output; tasks.py). The client
sends some feature-extraction options at the JSON root rather than under `parameters`; they
are accepted there too.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.api import common
from pipeserve.front.jsonio import json_response
from pipeserve.ipc import InputKind

# Fields the client puts at the JSON root, and the pipeline parameter each one is.
ROOT_PARAMETERS = {"normalize": "normalize", "truncate": "truncation",
                   "truncation_direction": "truncation_direction", "prompt_name": "prompt_name",
                   "dimensions": "dimensions"}
# Tasks whose answer stays a list of per-input answers for one input too (InferenceClient's
# text_classification takes element [0] of what it parses).
NESTED_SINGLE = frozenset({"text-classification"})
# `options` (the hosted API's use_cache / wait_for_model) is accepted and ignored.
JSON_FIELDS = frozenset({"inputs", "parameters", "options", "stream", "encoding_format", *ROOT_PARAMETERS})


async def predict(request: web.Request) -> web.Response:
    # First: while no model is loaded, what inputs and parameters it takes is not known yet.
    model = common.serving_model(request)
    # request.read() raises 413 past client_max_size (--max-body-bytes).
    inputs, parameters, single = parse_body(await request.read(), request.content_type, model.input_kind)
    jobs = await common.run_jobs(request, model, inputs, parameters)
    answers = common.results(jobs)
    unwrap = single and model.ready.task not in NESTED_SINGLE
    return json_response(answers[0] if unwrap else answers)


def parse_body(body: bytes, content_type: str, kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    """(inputs, parameters, single) from a raw body or a JSON {"inputs", "parameters"}.

    Text pipelines take strings. Image and audio pipelines take the bytes of a file: the raw
    body (whatever its Content-Type, as the client sends bytes without one), or base64 strings
    in JSON.
    """
    if not body:
        raise errors.BadRequest("empty body: send the input, or JSON {\"inputs\": ...}")
    if content_type == "application/json" or content_type.endswith("+json"):
        return _parse_json(body, kind)
    if kind is not InputKind.TEXT:
        return [body], {}, True
    if content_type.startswith(("image/", "audio/")):
        raise errors.BadRequest(f"this model takes text, not {content_type}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    return [text], {}, True


def _parse_json(body: bytes, kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    document = load_json_object(body, '{"inputs": ..., "parameters": {...}}')
    unknown = sorted(set(document) - JSON_FIELDS)
    if unknown:
        raise errors.BadRequest(f"unknown field {unknown[0]!r}; expected inputs, parameters")
    if "inputs" not in document:
        raise errors.BadRequest('missing "inputs"')
    if document.get("stream"):
        raise errors.BadRequest('"stream": true is not served on POST / yet')
    if document.get("encoding_format") not in (None, "float"):
        raise errors.BadRequest('"encoding_format" must be "float" here (base64: POST /v1/embeddings)')
    inputs = document["inputs"]
    single = not isinstance(inputs, list)
    items = [inputs] if single else inputs
    if not items:
        raise errors.BadRequest('"inputs" is an empty list')
    where = ['"inputs"'] if single else [f'"inputs"[{index}]' for index in range(len(items))]
    for place, item in zip(where, items, strict=True):
        if not isinstance(item, str):
            what = "a string" if kind is InputKind.TEXT else f"a base64-encoded {kind.value} file"
            raise errors.BadRequest(f"{place} must be {what}, not {json_type(item)}")
    if kind is not InputKind.TEXT:
        items = [_base64_file(item, place, kind) for place, item in zip(where, items, strict=True)]
    parameters = document.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise errors.BadRequest(f'"parameters" must be an object, not {json_type(parameters)}')
    for field, name in ROOT_PARAMETERS.items():
        if document.get(field) is not None:
            parameters = {**parameters, name: document[field]}
    return items, parameters, single


def load_json_object(body: bytes, expected: str) -> dict[str, Any]:
    """The JSON object a body holds, or BadRequest saying what was expected."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise errors.BadRequest(f"JSON body must be an object: {expected}")
    return document


def _base64_file(text: str, where: str, kind: InputKind) -> bytes:
    """The bytes of a base64 string, or of a data: URL (data:image/png;base64,...)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.BadRequest(f"{where} is not valid base64") from None
    if not data:
        raise errors.BadRequest(f"{where} is an empty {kind.value} file")
    return data


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/", predict)
