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

from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.api import common, tgi
from pipeserve.front.api.routes import ANY_JSON, TEXTS, Route, check_object, json_type, load_object, obj
from pipeserve.front.jsonio import json_response
from pipeserve.front.runtime import RUNTIME
from pipeserve.ipc import InputKind

# Fields the client puts at the JSON root, and the pipeline parameter each one is.
ROOT_PARAMETERS = {"normalize": "normalize", "truncate": "truncation",
                   "truncation_direction": "truncation_direction", "prompt_name": "prompt_name",
                   "dimensions": "dimensions"}
# Tasks whose answer stays a list of per-input answers for one input too (InferenceClient's
# text_classification takes element [0] of what it parses).
NESTED_SINGLE = frozenset({"text-classification"})
REQUEST = obj({
    "inputs": {**TEXTS, "description": "a text (or a base64 file for image and audio models), or a list"},
    "parameters": {"type": "object", "description": "the pipeline's keyword arguments (GET /info lists them)"},
    "options": {"type": "object", "description": "accepted and ignored (the hosted API's caching options)"},
    "stream": {"type": "boolean", "description": "text-generation: stream tokens as TGI does"},
    "encoding_format": {"type": "string", "enum": ["float"]},
    "normalize": {"type": "boolean"},
    "truncate": {"type": "boolean"},
    "truncation_direction": {"type": "string", "enum": ["left", "right", "Left", "Right"]},
    "prompt_name": {"type": "string"},
    "dimensions": {"type": "integer", "minimum": 1},
}, required=["inputs"])


async def predict(request: web.Request) -> web.StreamResponse:
    # First: while no model is loaded, what inputs and parameters it takes is not known yet.
    model = common.serving_model(request)
    # request.read() raises 413 past client_max_size (--max-body-bytes).
    body = await common.read_body(request)
    if not body:
        raise errors.BadRequest("empty body: send the input, or JSON {\"inputs\": ...}")
    if not _is_json(request.content_type):
        inputs, parameters, single = parse_raw(body, request.content_type, model.input_kind)
    else:
        document = load_object(body, REQUEST)  # parsed once, whichever path takes it
        if model.ready.task == "text-generation" and _for_the_engine(document):
            return await _generate(request, document)
        inputs, parameters, single = parse_document(document, model.input_kind)
    jobs = await common.run_jobs(request, model, inputs, parameters)
    answers = common.results(jobs)
    unwrap = single and model.ready.task not in NESTED_SINGLE
    return json_response(answers[0] if unwrap else answers)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _for_the_engine(document: dict[str, Any]) -> bool:
    """Streamed, or with details: a text-generation request TGI answers on POST /."""
    parameters = document.get("parameters")
    details = isinstance(parameters, dict) and parameters.get("details") is True
    return document.get("stream") is True or details


async def _generate(request: web.Request, document: dict[str, Any]) -> web.StreamResponse:
    limit = request.app[RUNTIME].config.max_new_tokens
    prompt, parameters, flags = tgi.parse(check_object(document, tgi.REQUEST), limit)
    if document.get("stream") is True:
        return await tgi.stream_events(request, prompt, parameters, flags)
    return json_response([await tgi.answer(request, prompt, parameters, flags)])


def parse_raw(body: bytes, content_type: str, kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    """(inputs, parameters, single) from a non-JSON body: the one input.

    Text pipelines take the body as UTF-8 text. Image and audio pipelines take it as the bytes of
    a file (whatever its Content-Type, as the client sends bytes without one).
    """
    if kind is not InputKind.TEXT:
        return [body], {}, True
    if content_type.startswith(("image/", "audio/")):
        raise errors.BadRequest(f"this model takes text, not {content_type}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    return [text], {}, True


def parse_document(document: dict[str, Any], kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    """(inputs, parameters, single) from JSON {"inputs", "parameters"}: texts, or base64 files
    for image and audio pipelines."""
    document = check_object(document, REQUEST)
    if document.get("stream"):
        raise errors.BadRequest('"stream": true needs a text-generation model')
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


ROUTES = (
    Route("POST", "/", predict, "Run the pipeline (the Hugging Face Inference API)", "hf",
          request=REQUEST, response=ANY_JSON,
          raw_bodies=("text/plain", "application/octet-stream")),
)
