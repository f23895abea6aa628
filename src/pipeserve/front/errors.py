"""One error hierarchy: each class carries its HTTP status and a short public message.

The HTTP layer turns any PipeserveError into `{"error": message, "request_id": ...}` with the
class's status; everything else becomes a generic 500 and the detail goes to the log only, so no
response ever carries a traceback, a file path or an exception repr.
"""

from __future__ import annotations

from pipeserve.ipc import ErrorKind


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

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.message}
        if self.index is not None:
            body["index"] = self.index
        return body

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


class PayloadTooLarge(PipeserveError):
    status = 413
    default_message = "request too large"


class InputTooLargeForMemory(PipeserveError):
    """A single input that does not fit in the model's memory even alone. Retrying cannot help."""

    status = 413
    default_message = "input too large for the model's memory"


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
    ErrorKind.OUT_OF_MEMORY: InputTooLargeForMemory,
    ErrorKind.INTERNAL: InferenceFailed,
}


def error_for_kind(kind: ErrorKind, message: str) -> PipeserveError:
    """The public error for an input that failed in the model process."""
    return _ERROR_FOR_KIND.get(kind, InferenceFailed)(message)
