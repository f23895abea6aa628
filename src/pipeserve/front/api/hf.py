"""The Hugging Face Inference API dialect: `POST /` with a raw body or `{"inputs", "parameters"}`.

Answers in the shape the Inference API gives for each task, as huggingface_hub's
InferenceClient parses it (the model process shapes each task's output; tasks.py). The client
sends some feature-extraction options at the JSON root rather than under `parameters`; they
are accepted there too. On a text generator, `POST /` is TGI's (tgi.py), as on the hosted API.
Its error envelope, `{"error": message[, "index": i]}`, is pipeserve's own too.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from aiohttp import web

from pipeserve.front import errors
from pipeserve.front.api import common, tgi
from pipeserve.front.api.contract import (
    Answer,
    Body,
    Dimensions,
    PromptName,
    Texts,
    TruncationDirection,
    decode,
    describe,
    fact,
    neutral,
    taken,
    truncation_direction,
)
from pipeserve.front.api.routes import Dialect, Route
from pipeserve.front.jsonio import json_response
from pipeserve.ipc import GENERATION_TASK, InputKind


class HfError(Answer):
    error: str
    index: Annotated[int, describe("the failed input of a list", minimum=0)] | None = None


def hf_body(error: errors.PipeserveError) -> dict[str, object]:
    body: dict[str, object] = {"error": error.message}
    if error.index is not None:
        body["index"] = error.index
    return body


DIALECT = Dialect("hf", hf_body, HfError)


class Request(Body):
    inputs: Annotated[Texts, describe("a text (or a base64 file for image and audio models), or a list")]
    parameters: Annotated[dict[str, Any], fact("parameters"),
                          describe("the pipeline's keyword arguments (GET /info lists them)")] | None = None
    options: Annotated[dict[str, Any], describe("accepted and ignored (the hosted API's caching options)")] \
        | None = None
    stream: Annotated[bool, neutral(False)] | None = None  # true: a text generator's (tgi.RootRequest)
    encoding_format: Literal["float"] | None = None
    # Feature-extraction options InferenceClient sends at the root: (field, pipeline parameter).
    normalize: Annotated[bool, taken("normalize")] | None = None
    truncate: Annotated[bool, taken("truncation")] | None = None
    truncation_direction: Annotated[TruncationDirection, taken("truncation_direction")] | None = None
    prompt_name: PromptName | None = None
    dimensions: Dimensions | None = None


# Tasks whose answer stays a list of per-input answers for one input too (InferenceClient's
# text_classification takes element [0] of what it parses).
NESTED_SINGLE = frozenset({"text-classification"})


async def predict(request: web.Request) -> web.StreamResponse:
    # First: while no model is loaded, what inputs and parameters it takes is not known yet.
    model = await common.serving_model(request)
    # request.read() raises 413 past client_max_size (--max-body-bytes).
    body = await common.read_body(request)
    if not body:
        raise errors.BadRequest("empty body: send the input, or JSON {\"inputs\": ...}")
    generates = model.ready.task == GENERATION_TASK
    if not _is_json(request.content_type):
        inputs, parameters, single = parse_raw(body, request.content_type, model.input_kind)
        if generates:
            return await tgi.root(request, tgi.RootRequest(inputs=inputs[0]))
    elif generates:
        return await tgi.root(request, decode(body, tgi.RootRequest))
    else:
        inputs, parameters, single = parse_document(decode(body, Request), model.input_kind)
    jobs = await common.run_jobs(request, model, inputs, parameters)
    answers = common.results(jobs)
    unwrap = single and model.ready.task not in NESTED_SINGLE
    return json_response(answers[0] if unwrap else answers)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


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


def parse_document(document: Request, kind: InputKind) -> tuple[list[Any], dict[str, Any], bool]:
    """(inputs, parameters, single) from JSON {"inputs", "parameters"}: texts, or base64 files
    for image and audio pipelines."""
    if document.stream:
        raise errors.BadRequest('"stream": true needs a text-generation model', param="stream")
    single = isinstance(document.inputs, str)
    items = [document.inputs] if isinstance(document.inputs, str) else document.inputs
    if kind is not InputKind.TEXT:
        where = ['"inputs"'] if single else [f'"inputs"[{index}]' for index in range(len(items))]
        return [_base64_file(item, place, kind) for place, item in zip(where, items, strict=True)], \
            _parameters(document), single
    return list(items), _parameters(document), single


def _parameters(document: Request) -> dict[str, Any]:
    """The pipeline's parameters: `parameters`, and the options sent at the root."""
    root = {"normalize": document.normalize, "truncation": document.truncate,
            "truncation_direction": truncation_direction(document.truncation_direction),
            "prompt_name": document.prompt_name, "dimensions": document.dimensions}
    # `parameters` over the root's: a value there is checked even where the root sets it too.
    return {**{name: value for name, value in root.items() if value is not None}, **(document.parameters or {})}


def _base64_file(text: str, where: str, kind: InputKind) -> bytes:
    """The bytes of a base64 string, or of a data: URL (data:image/png;base64,...)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.BadRequest(f"{where} is not valid base64", param="inputs") from None
    if not data:
        raise errors.BadRequest(f"{where} is an empty {kind.value} file", param="inputs")
    return data


ROUTES = (
    Route("POST", "/", predict, "Run the pipeline (the Hugging Face Inference API)", DIALECT,
          request=Request, request_by_task={GENERATION_TASK: tgi.RootRequest},
          dialect_by_task={GENERATION_TASK: tgi.DIALECT}, response=Any,
          raw_bodies=("text/plain", "application/octet-stream"), events=tgi.EVENTS),
)
