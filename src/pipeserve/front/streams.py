"""Generated streams in the front: admission, routing of tokens to their requests, cancellation.

A stream is one generated sequence. `Streams.open` is its door: a non-blocking check of what
generation really costs (sequences per worker: --max-running-sequences decoding together plus
as many waiting), then a `Generate` message to the serving worker with the fewest streams.
Each `Step` from a worker is split per stream into that stream's queue, its tokens paired with
the end that came in the same step, so a handler knows which token is the last one. A stream's
queue holds at most its max_new_tokens tokens: a slow reader delays only its own stream. A
worker's death ends each of its streams with an error within the time it takes to notice it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeserve import ipc
from pipeserve.front import errors

log = logging.getLogger("pipeserve.streams")

WAITING_PER_RUNNING = 1  # sequences a worker may hold waiting, per one it can run


@dataclass
class Event:
    """A token, with the stream's end when that token was its last; or an end alone, with the
    public error when the stream failed."""

    token: ipc.Token | None
    end: ipc.StreamEnd | None = None
    error: errors.PipeserveError | None = None


@dataclass(eq=False)
class Stream:
    stream_id: int
    worker: Any  # the WorkerProcess generating it
    request_id: str
    opened_at: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    end: ipc.StreamEnd | None = None
    tokens: int = 0
    first_token_at: float | None = None
    peeked: Event | None = None  # the first event, taken before the response was started
    # The worker sent its end (or died): it holds nothing of this stream any more, though the front
    # keeps it open until its client has read that end, which a client that stops reading never does.
    ended_there: bool = False


class Streams:
    """Every open stream of the front, by id."""

    def __init__(self, max_running: int, serving_workers: Callable[[], list[Any]],
                 observe: Callable[[Stream], None] | None = None,
                 first_token: Callable[[float], None] | None = None,
                 why_unavailable: Callable[[], object] | None = None) -> None:
        self.max_running = max_running
        self._serving_workers = serving_workers
        # Raises the model's own 503 (its reason and Retry-After) while no worker takes work.
        self._why_unavailable = why_unavailable
        self._observe = observe  # a stream that ended
        self._first_token = first_token  # seconds from a stream's start to its first token
        self.tokens = 0  # tokens delivered to streams since start
        self.steps = 0  # decoding steps (one forward pass each) that produced tokens
        self.shared_steps = 0  # of those, the ones that decoded more than one stream together
        self._ids = itertools.count(1)
        self.open: dict[int, Stream] = {}
        self.cancelled = 0  # streams whose client went away or whose deadline passed
        self.refused = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed_reason: str | None = None
        self._cancels: set[asyncio.Task[None]] = set()  # Cancel messages on their way to a worker

    def close(self, reason: str) -> None:
        """Refuse new streams with 503 `reason` (draining); open ones run to their end."""
        self._closed_reason = reason

    # --- the door ------------------------------------------------------------------------------

    async def start(self, request_id: str, prompt: str | None, parameters: dict[str, Any],
                    messages: list[dict[str, Any]] | None = None) -> Stream:
        """Open a stream on the least busy serving worker; 503 at once when all are full."""
        if self._closed_reason is not None:
            raise errors.Unavailable(self._closed_reason, retry_after=1)
        workers = self._serving_workers()
        if not workers:  # loading, restarting, or draining past --max-worker-memory
            self.refused += 1
            # The answer a request that came a moment earlier got from the runtime (a drain that
            # began while this body was read says "restarting to return memory", not a vaguer one).
            if self._why_unavailable is not None:
                self._why_unavailable()
            raise errors.Unavailable("no model process is taking new streams right now", retry_after=1)
        load = {id(worker): 0 for worker in workers}
        for stream in self._generating():
            if id(stream.worker) in load:
                load[id(stream.worker)] += 1
        worker = min(workers, key=lambda w: load[id(w)])
        if load[id(worker)] >= self.max_running * (1 + WAITING_PER_RUNNING):
            self.refused += 1
            raise errors.Overloaded("server overloaded: every worker is generating its most sequences",
                                    retry_after=1)
        stream = Stream(next(self._ids), worker, request_id)
        self.open[stream.stream_id] = stream
        self._idle.clear()
        try:
            await worker.send(ipc.Generate(stream.stream_id, prompt, parameters, request_id, messages))
        except (ConnectionError, OSError):
            self._close(stream)
            raise errors.WorkerCrashed("the model process is restarting", retry_after=1) from None
        except BaseException:  # the client left while a busy worker's pipe was full: the frame
            self.release(stream)  # is already buffered, so the worker must be told to cancel it
            raise
        return stream

    @contextlib.asynccontextmanager
    async def opened(self, request_id: str, prompt: str | None, parameters: dict[str, Any],
                     messages: list[dict[str, Any]] | None = None) -> AsyncIterator[Stream]:
        """A stream for the body of an `async with`, released however the body ends (an answer,
        an error, or the client going away at any await), so no stream outlives its request."""
        stream = await self.start(request_id, prompt, parameters, messages)
        try:
            yield stream
        finally:
            self.release(stream)

    # --- from the workers ------------------------------------------------------------------------

    def deliver(self, step: ipc.Step) -> None:
        """Hand each token (and end) of a step to its stream."""
        ends = {end.stream_id: end for end in step.ended}
        if step.tokens:
            self.steps += 1
            if len({token.stream_id for token in step.tokens}) > 1:
                self.shared_steps += 1
        # A stream can get two tokens in one step (a newcomer's first from its prefill, its second
        # from the decoding that follows): its end goes with the last of them.
        last = {token.stream_id: index for index, token in enumerate(step.tokens)}
        for index, token in enumerate(step.tokens):
            stream = self.open.get(token.stream_id)
            if stream is None:
                continue  # cancelled meanwhile
            if stream.first_token_at is None:
                stream.first_token_at = time.monotonic()
                if self._first_token is not None:
                    self._first_token(stream.first_token_at - stream.opened_at)
            stream.tokens += 1
            self.tokens += 1
            end = ends.pop(token.stream_id, None) if last[token.stream_id] == index else None
            stream.ended_there |= end is not None
            stream.queue.put_nowait(Event(token, end, _error(end)))
        for end in ends.values():
            stream = self.open.get(end.stream_id)
            if stream is not None:
                stream.ended_there = True
                stream.queue.put_nowait(Event(None, end, _error(end)))

    def worker_died(self, worker: Any, cause: str) -> None:
        """End every stream of a dead worker with an error event."""
        message = f"the model process crashed ({cause}) while generating"
        self._end_all(worker, errors.WorkerCrashed(message, retry_after=1))

    def _end_all(self, worker: Any, error: errors.PipeserveError) -> None:
        for stream in [s for s in self._generating() if s.worker is worker]:
            stream.ended_there = True
            stream.queue.put_nowait(_failure(stream, error))

    # --- a generation that hangs -----------------------------------------------------------------

    async def watch(self, bound: float) -> None:
        """Kill a worker whose generation stalls: open streams, and not a word from it for `bound`.

        A decoding step takes milliseconds to a second; a process that sends nothing for
        --batch-timeout while it has sequences to step is stuck (a hung kernel, a stopped
        process). Its streams end with a timeout error event, and it is killed and restarted,
        as a batch that runs past the same bound is. Without this a stuck step would hold its
        streams until their --generation-timeout.
        """
        while True:
            await asyncio.sleep(min(1.0, bound / 4))
            for worker in self.stalled_workers(time.monotonic(), bound):
                log.error("worker[%d] pid=%s: no generation step in %gs (--batch-timeout); killing it",
                          worker.spec.worker_index, worker.pid, bound)
                self._end_all(worker, errors.BatchTimedOut(
                    f"generation stalled: no step from the model process in {bound:g}s; it was restarted"))
                worker.kill(f"no generation step in {bound:g}s (--batch-timeout)")

    def stalled_workers(self, now: float, bound: float) -> list[Any]:
        """Workers silent for `bound` since the later of their last message and their oldest open stream."""
        oldest: dict[int, tuple[Any, float]] = {}
        for stream in self._generating():
            worker, opened = oldest.get(id(stream.worker), (stream.worker, stream.opened_at))
            oldest[id(worker)] = (worker, min(opened, stream.opened_at))
        return [worker for worker, opened in oldest.values() if now - max(worker.last_heard_at, opened) > bound]

    # --- for the handler -----------------------------------------------------------------------

    async def first_event(self, stream: Stream, deadline: float) -> Event:
        """Wait for the stream's first event before a response is started; a stream that ends
        before its first token (the model refused the prompt, the worker died, the deadline
        passed) raises its error, so the client gets a 4xx/5xx status, not a failed stream."""
        remaining = deadline - time.monotonic()
        try:
            event = await asyncio.wait_for(stream.queue.get(), max(remaining, 0))
        except TimeoutError:
            raise errors.RequestTimeout("request timed out before the first token") from None
        errors.raise_if_cancelled()  # a client that left as the event came (Python 3.11's wait_for)
        if event.end is not None:
            stream.end = event.end
        if event.error is not None and event.token is None:
            raise event.error
        stream.peeked = event
        return event

    async def events(self, stream: Stream, deadline: float) -> AsyncIterator[Event]:
        """The stream's events until its end; a deadline ends it with a timeout error event.

        The stream is released when the iteration stops, however it stops: a client that went
        away (the handler is cancelled) cancels its sequence at the next step.
        """
        try:
            if stream.peeked is not None:
                event, stream.peeked = stream.peeked, None
                yield event
                if event.end is not None:
                    return
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(stream.queue.get(), max(remaining, 0))
                except TimeoutError:
                    yield _failure(stream, errors.RequestTimeout("request timed out while generating"))
                    return
                errors.raise_if_cancelled()  # a client that left as the event came (Python 3.11's wait_for)
                if event.end is not None:
                    stream.end = event.end
                yield event
                if event.end is not None:
                    return
        finally:
            self.release(stream)

    def release(self, stream: Stream) -> None:
        """Close the stream in the front (idempotent); one the worker has not ended is cancelled
        there, by a message sent in the background: releasing never waits on a busy pipe."""
        if self.open.get(stream.stream_id) is not stream:
            return
        if stream.end is None:  # its client did not read its end: counted as the metric counts it
            self.cancelled += 1
            if not stream.ended_there:
                task = asyncio.ensure_future(self._send_cancel(stream))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
        self._close(stream)

    @staticmethod
    async def _send_cancel(stream: Stream) -> None:
        try:
            await stream.worker.send(ipc.Cancel(stream.stream_id))
        except (ConnectionError, OSError):
            pass  # the worker is gone, and its sequence with it

    async def settle(self, timeout: float) -> None:
        """Let Cancel messages still on their way reach their workers (at shutdown)."""
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=timeout)
        for task in set(self._cancels):
            task.cancel()

    def _close(self, stream: Stream) -> None:
        if self.open.pop(stream.stream_id, None) is not None and self._observe is not None:
            self._observe(stream)
        if not self.open:
            self._idle.set()
        stream.worker.retire_when_idle()

    def held_by(self, worker: Any) -> int:
        """Streams `worker` is generating."""
        return sum(stream.worker is worker for stream in self._generating())

    def _generating(self) -> list[Stream]:
        """Open streams whose worker has not ended them: what admission counts, what the stall
        watchdog waits on, what keeps a worker from retiring."""
        return [stream for stream in self.open.values() if not stream.ended_there]

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _failure(stream: Stream, error: errors.PipeserveError) -> Event:
    """The final event of a stream that the front ends with an error (not the worker)."""
    end = ipc.StreamEnd(stream.stream_id, "error", stream.tokens, 0,
                        error=ipc.Failed(ipc.ErrorKind.INTERNAL, error.message))
    return Event(None, end, error)


def _error(end: ipc.StreamEnd | None) -> errors.PipeserveError | None:
    if end is None or end.error is None:
        return None
    return errors.error_for_kind(end.error.kind, end.error.message)
