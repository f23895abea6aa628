"""One error hierarchy: each class carries its HTTP status and a short public message.

The HTTP layer turns any PipeserveError into `{"error": message, "request_id": ...}` with the
class's status; everything else becomes a generic 500 and the detail goes to the log only, so no
response ever carries a traceback, a file path or an exception repr.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeserve.ipc import ErrorKind

# (status, public message, failed input's index) -> the JSON body of an error response.
Envelope = Callable[[int, str, "int | None"], dict[str, object]]


class PipeserveError(Exception):
    """An error with a status and a message that are safe to show to a client."""

    status = 500
    default_message = "internal server error"

    def __init__(self, message: str | None = None, *, retry_after: int | None = None,
                 index: int | None = None) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        self.index = index  # which input of a list request failed, when one did
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def at_index(self, index: int) -> PipeserveError:
        """The same error, marked as belonging to input `index` of a list request."""
        return type(self)(self.message, retry_after=self.retry_after, index=index)


class BadRequest(PipeserveError):
    status = 400
    default_message = "bad request"


class Unauthorized(PipeserveError):
    status = 401
    default_message = "missing or invalid API key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(PipeserveError):
    status = 404
    default_message = "not found"


class PayloadTooLarge(PipeserveError):
    status = 413
    default_message = "request too large"


class InputTooLargeForMemory(PipeserveError):
    """A single input that does not fit in the model's memory even alone. Retrying cannot help."""

    status = 413
    default_message = "input too large for the model's memory"


class BodyTimeout(PipeserveError):
    status = 408
    default_message = "request body not received in time (--body-timeout)"


class Unavailable(PipeserveError):
    """The model is not serving right now (loading, restarting, draining): retry later."""

    status = 503
    default_message = "model not available"


class Overloaded(Unavailable):
    default_message = "server overloaded: the queue is full"


class WorkerCrashed(Unavailable):
    default_message = "the model process crashed while this request was queued or running"


class RequestTimeout(PipeserveError):
    status = 504
    default_message = "request timed out"


class BatchTimedOut(RequestTimeout):
    default_message = "the model took longer than the batch timeout; its process was restarted"


class InferenceFailed(PipeserveError):
    status = 500
    default_message = "inference failed"


_ERROR_FOR_KIND: dict[ErrorKind, type[PipeserveError]] = {
    ErrorKind.BAD_INPUT: BadRequest,
    ErrorKind.TOO_LARGE: PayloadTooLarge,
    ErrorKind.OUT_OF_MEMORY: InputTooLargeForMemory,
    ErrorKind.INTERNAL: InferenceFailed,
}


def error_for_kind(kind: ErrorKind, message: str) -> PipeserveError:
    """The public error for an input that failed in the model process."""
    return _ERROR_FOR_KIND.get(kind, InferenceFailed)(message)


# --- the envelope each API dialect wraps an error in -------------------------------------------


def hf_body(status: int, message: str, index: int | None = None) -> dict[str, object]:
    """The Inference API's (and pipeserve's own): {"error": message[, "index": i]}."""
    body: dict[str, object] = {"error": message}
    if index is not None:
        body["index"] = index
    return body


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error",
                 504: "timeout_error"}


def openai_body(status: int, message: str, index: int | None = None) -> dict[str, object]:
    """OpenAI's: {"error": {"message", "type", "param", "code"}} (the openai SDK reads it)."""
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"),
                      "param": "input" if index is not None else None, "code": None}}


# text-embeddings-inference's error_type names, lower-cased as huggingface_hub matches them.
_TEI_TYPES = {400: "validation", 401: "unauthorized", 404: "validation", 405: "validation",
              413: "validation", 503: "overloaded", 504: "backend"}


def tei_body(status: int, message: str, index: int | None = None) -> dict[str, object]:
    """text-embeddings-inference's: {"error": message, "error_type": kind}."""
    return {"error": message, "error_type": _TEI_TYPES.get(status, "backend")}


# A route's declared dialect (api/routes.Route.dialect) -> the envelope of its errors.
ENVELOPES: dict[str, Envelope] = {"hf": hf_body, "ops": hf_body, "openai": openai_body, "tei": tei_body}
