"""One error hierarchy: each class carries its HTTP status and a short public message.

The HTTP layer turns any PipeserveError into `{"error": message, "request_id": ...}` with the
class's status; everything else becomes a generic 500 and the detail goes to the log only, so no
response ever carries a traceback, a file path or an exception repr.
"""

from __future__ import annotations

import re

# Exit codes of the front process.
EXIT_OK = 0
EXIT_CRASH_LOOP = 1  # the worker kept dying: let the service manager take over
EXIT_USAGE = 2  # argparse's convention
EXIT_LOAD_FAILED = 3  # the model (or custom pipeline) could not be loaded


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


# Error kinds that cross the pipe from the model process (as plain strings, never pickled
# exceptions), and the public error each one becomes.
KIND_BAD_INPUT = "bad_input"
KIND_OUT_OF_MEMORY = "out_of_memory"
KIND_INTERNAL = "internal"

_ERROR_FOR_KIND: dict[str, type[PipeserveError]] = {
    KIND_BAD_INPUT: BadRequest,
    KIND_OUT_OF_MEMORY: InputTooLargeForMemory,
    KIND_INTERNAL: InferenceFailed,
}


def error_for_kind(kind: str, message: str) -> PipeserveError:
    return _ERROR_FOR_KIND.get(kind, InferenceFailed)(message)


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-~@+]+){2,}[/\\]?")
_MAX_PUBLIC_MESSAGE = 300


def public_message(text: str) -> str:
    """The first line of an exception message, without file paths, short enough to show."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = _PATH.sub("<path>", first)
    if len(first) > _MAX_PUBLIC_MESSAGE:
        first = first[: _MAX_PUBLIC_MESSAGE - 1] + "…"
    return first
