"""One error hierarchy: each class carries its HTTP status and a short public message.

The HTTP layer turns any PipeserveError into its status and the JSON envelope of the API
dialect the request came through (each dialect declares its own: api/routes.Dialect);
everything else becomes a generic 500 and the detail goes to the log only, so no response ever
carries a traceback, a file path or an exception repr.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeserve.ipc import ErrorKind

# An error -> the JSON body of its response, in one API dialect's shape (api/routes.Dialect).
Envelope = Callable[["PipeserveError"], dict[str, object]]


class PipeserveError(Exception):
    """An error with a status and a message that are safe to show to a client."""

    status = 500
    default_message = "internal server error"

    def __init__(self, message: str | None = None, *, retry_after: int | None = None,
                 index: int | None = None, param: str | None = None, code: str | None = None) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        self.index = index  # which input of a list request failed, when one did
        self.param = param  # the request field it is about, when one is (OpenAI's envelope names it)
        self.code = code  # a machine-readable kind, where OpenAI has one (model_not_found)
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def at_index(self, index: int) -> PipeserveError:
        """The same error, marked as belonging to input `index` of a list request."""
        return type(self)(self.message, retry_after=self.retry_after, index=index, param=self.param, code=self.code)


class HttpError(PipeserveError):
    """aiohttp's own refusals (no route 404, 405, its body limit's 413), in a dialect's envelope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def raise_if_cancelled() -> None:
    """Raise the cancellation of this task that an await inside it returned past.

    On Python 3.11, asyncio.wait_for (used throughout the standard library and aiohttp) returns
    its inner result when that completes as the outer task is cancelled, and the cancellation
    is lost: a loop that goes on would never stop. The task still counts it (`cancelling`).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
