"""Admission and batch formation, in the front process (pure asyncio, no processes).

Each input of a request is one `Job` with its own Future. `submit` is the door: a non-blocking
check against the bounded queue (unit: queued inputs, not requests or connections) that raises
`Overloaded` (503 + Retry-After) at once. `next_batch` is called by a worker's loop when that
worker is idle: it waits for the first job, then at most `max_batch_delay` counted once from that
job's arrival, and returns up to `limit` live jobs that share the first job's parameters. Jobs
whose client went away, or whose deadline passed, are dropped here and never computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeserve.front import errors
from pipeserve.ipc import Op


class Dropped(enum.StrEnum):
    """Why a queued job was dropped without being computed."""

    DISCONNECTED = "disconnected"  # the client went away before its batch started
    EXPIRED = "expired"  # its deadline passed before a batch could take it


class Refused(enum.StrEnum):
    """Why a request was refused at the door (503)."""

    QUEUE_FULL = "queue_full"
    QUEUE_WAIT = "queue_wait"  # the oldest queued job has waited past --max-queue-wait-ms
    DEADLINE = "deadline"  # the backlog ahead cannot drain before the request's deadline


class Order(enum.StrEnum):
    LENGTH = "length"
    ARRIVAL = "arrival"


_REFUSAL_MESSAGES = {
    Refused.QUEUE_FULL: "server overloaded: the queue is full",
    Refused.QUEUE_WAIT: "server overloaded: queued requests are waiting too long",
    Refused.DEADLINE: "server overloaded: the queue cannot drain before this request's deadline",
}
_RATE_SMOOTHING = 0.3  # weight of the newest batch in the drain-rate estimate
# Weight of the newest batch in the batch-time estimate that sizes --batch-window: batches of
# short and long inputs differ several-fold, so this averages over the last ~20.
_BATCH_TIME_SMOOTHING = 0.05
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


# Default for the share of real (unpadded) tokens below which an input is left for the next
# batch rather than padded: on a CPU, padding a 10-token text to 135 costs more than a call.
DEFAULT_MIN_BATCH_FILL = 0.85
# How many same-parameter jobs, oldest first, a batch is chosen from.
LENGTH_WINDOW = 256


def estimate_tokens(item: Any) -> int:
    """A cheap token-count estimate for batching (about 4 characters a token for text)."""
    if isinstance(item, str):
        return len(item) // 4 + 2
    if isinstance(item, dict):  # a text pair (rerank, predict)
        return sum(len(value) // 4 for value in item.values() if isinstance(value, str)) + 3
    if isinstance(item, list):  # token ids (decode)
        return len(item)
    return 1


@dataclass(eq=False)
class Job:
    input: Any
    parameters: dict[str, Any]
    parameters_key: str
    request_id: str
    enqueued_at: float
    deadline: float
    future: asyncio.Future[Any] = field(repr=False)
    tokens: int = 1  # estimated, for length-aware batching
    batch_size: int = 0  # set when a batch takes it, for the access log
    op: Op = Op.PIPELINE
    token_count: int | None = None  # counted by the model process, where it reports it (usage)


def resolve(job: Job, value: Any = None, error: BaseException | None = None) -> None:
    """Settle a job's Future unless it is already settled (cancelled, timed out, answered)."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(value)


class Batcher:
    def __init__(self, max_batch_size: int, max_batch_delay_s: float, max_queue: int,
                 max_queue_wait_s: float | None = None, max_batch_tokens: int | None = None,
                 order: str = Order.LENGTH, min_batch_fill: float = DEFAULT_MIN_BATCH_FILL,
                 shortest_first_s: float | None = None, window_batches: float | None = None,
                 clock: Callable[[], float] = time.monotonic, workers: int = 1) -> None:
        self.max_batch_tokens = max_batch_tokens
        # Model processes taking batches from this queue at once: the queue drains that many
        # times faster than one batch's items per compute second.
        self.workers = workers
        self.shortest_first_s = shortest_first_s
        # Arrival order never lets a job overtake an older one: no window to apply there.
        self.window_batches = window_batches if Order(order) is Order.LENGTH else None
        self.order = Order(order)
        self.min_batch_fill = min_batch_fill
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self._clock = clock
        self._queue: deque[Job] = deque()
        self._arrival = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._open_requests = 0  # requests between their door and their last window (see request())
        self._closed_reason: str | None = None
        self._items_per_second: float | None = None
        self._batch_seconds: float | None = None  # a batch's mean compute time, slowly smoothed
        self.in_flight = 0
        self.dropped: Counter[Dropped] = Counter()
        self.refused: Counter[Refused] = Counter()
        self.batches = 0
        self.items = 0

    # --- the door -----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    def close(self, reason: str) -> None:
        """Refuse new jobs with 503 `reason` (draining, no worker); queued jobs stay."""
        self._closed_reason = reason

    def open(self) -> None:
        self._closed_reason = None

    def submit(self, inputs: list[Any], parameters: dict[str, Any], parameters_key: str,
               request_id: str, deadline: float, op: Op = Op.PIPELINE, admitted: bool = False,
               expected: int | None = None) -> list[Job]:
        """Queue one job per input, all or none; raise Unavailable/Overloaded without waiting.

        `admitted`: a later window of a request the door took (api/common.py): never refused,
        draining or not. `expected`: the whole request's inputs, for the deadline prediction.
        """
        if self._closed_reason is not None and not admitted:
            raise errors.Unavailable(self._closed_reason, retry_after=self.retry_after())
        now = self._clock()
        self._drop_dead_head()
        refusal = None if admitted else self._refusal(len(inputs), expected or len(inputs), now, deadline)
        if refusal is not None:
            self.refused[refusal] += 1
            raise errors.Overloaded(_REFUSAL_MESSAGES[refusal], retry_after=self.retry_after())
        loop = asyncio.get_running_loop()
        key = parameters_key if op is Op.PIPELINE else f"{op}:{parameters_key}"
        jobs = [Job(item, parameters, key, request_id, now, deadline, loop.create_future(),
                    estimate_tokens(item), op=op)
                for item in inputs]
        self._queue.extend(jobs)
        self._idle.clear()
        self._arrival.set()
        return jobs

    @property
    def room(self) -> int:
        """How many more inputs the queue takes before it is full."""
        return max(0, self.max_queue - len(self._queue))

    def _refusal(self, count: int, expected: int, now: float, deadline: float) -> Refused | None:
        if len(self._queue) + count > self.max_queue:
            return Refused.QUEUE_FULL
        if (self.max_queue_wait_s is not None and self._queue
                and now - self._queue[0].enqueued_at > self.max_queue_wait_s):
            return Refused.QUEUE_WAIT
        backlog = len(self._queue) + self.in_flight
        # Only a real backlog (more than one batch) is worth predicting from the drain rate.
        rate = self.drain_rate()
        if (rate and backlog >= self.max_batch_size and now + (backlog + expected) / rate > deadline):
            return Refused.DEADLINE
        return None

    def drain_rate(self) -> float | None:
        """Inputs per second the queue drains at: a batch's measured rate, once per worker."""
        return self._items_per_second * self.workers if self._items_per_second else None

    def retry_after(self) -> int:
        """Seconds for the current backlog to drain at the measured rate, clamped to 1..60."""
        rate = self.drain_rate()
        if not rate:
            return RETRY_AFTER_MIN_S
        seconds = (len(self._queue) + self.in_flight) / rate
        return int(min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(seconds))))

    # --- batch formation ----------------------------------------------------------------------

    async def next_batch(self, limit: int | None = None) -> list[Job]:
        """Wait for and return the next batch (1..limit live jobs with identical parameters)."""
        limit = min(limit or self.max_batch_size, self.max_batch_size)
        while True:
            self._drop_dead_head()
            if not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            first = self._queue[0]
            remaining = first.enqueued_at + self.max_batch_delay_s - self._clock()
            if remaining > 0 and self._count_matching(first.parameters_key, limit) < limit:
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            return self._take(first.parameters_key, limit)

    def _is_dead(self, job: Job, now: float) -> bool:
        if job.future.done():  # its handler gave up: at its deadline, or the client went away
            self.dropped[Dropped.EXPIRED if now >= job.deadline else Dropped.DISCONNECTED] += 1
            return True
        if now >= job.deadline:
            self.dropped[Dropped.EXPIRED] += 1
            resolve(job, error=errors.RequestTimeout("request timed out while queued"))
            return True
        return False

    def _drop_dead_head(self) -> None:
        now = self._clock()
        while self._queue and self._is_dead(self._queue[0], now):
            self._queue.popleft()
        self._update_idle()

    def _count_matching(self, key: str, limit: int) -> int:
        count = 0
        for job in self._queue:
            if job.parameters_key == key:
                count += 1
                if count >= limit:
                    break
        return count

    def _take(self, key: str, limit: int) -> list[Job]:
        now = self._clock()
        window = self.window_s()
        candidates: list[Job] = []
        dead: set[Job] = set()
        for job in self._queue:
            if job.parameters_key != key:
                continue
            if self._is_dead(job, now):  # counted once, here
                dead.add(job)
                continue
            if window is not None and candidates and job.enqueued_at - candidates[0].enqueued_at > window:
                continue  # it may not overtake the oldest: it waits for a later batch
            candidates.append(job)
            if len(candidates) >= LENGTH_WINDOW:
                break
        batch = self._choose(candidates, limit, now)
        # Dead jobs of other parameters stay until a batch meets them, and are counted then.
        removed = dead.union(batch)
        self._queue = deque(job for job in self._queue if job not in removed)
        self.in_flight += len(batch)
        return batch

    def _choose(self, candidates: list[Job], limit: int, now: float) -> list[Job]:
        """An anchor job, plus up to limit-1 others: of similar length, or in arrival order.

        Length order sorts the candidates by estimated tokens and grows the batch outwards from
        the anchor, always taking the neighbour nearest its length, as long as the padded size
        (longest x count) fits --max-batch-tokens and at least --min-batch-fill of it are real
        tokens. The anchor is the oldest job, so nothing starves; with --shortest-first-ms it is
        the shortest job instead, until the oldest has waited that long (see _anchor). With
        --batch-window the candidates are only the jobs that arrived within that many batch times
        of the oldest (see window_s): a job's neighbours by length then cannot be much younger
        than it, so fewer jobs are passed over batch after batch, which is what makes the tail.
        """
        if not candidates:
            return []
        if self.order is Order.ARRIVAL:
            batch = [candidates[0]]
            for job in candidates[1:limit]:
                if not self._fits(batch, job):
                    break
                batch.append(job)
            return batch
        anchor = self._anchor(candidates, now)
        ordered = sorted(candidates, key=lambda job: job.tokens)
        low = high = ordered.index(anchor)
        batch = [anchor]
        while len(batch) < limit:
            shorter = ordered[low - 1] if low > 0 else None
            longer = ordered[high + 1] if high + 1 < len(ordered) else None
            options = sorted((job for job in (shorter, longer) if job is not None),
                             key=lambda job: abs(job.tokens - anchor.tokens))
            chosen = next((job for job in options if self._fits(batch, job)), None)
            if chosen is None:
                break
            batch.append(chosen)
            if chosen is shorter:
                low -= 1
            else:
                high += 1
        return batch

    def window_s(self) -> float | None:
        """How much later than the oldest job a job may have arrived to join its batch, or None.

        In batch times rather than seconds, so that one setting holds for a fast model and a
        slow one alike: at most about that many batches per worker can overtake a job."""
        if self.window_batches is None or self._batch_seconds is None:
            return None
        return self.window_batches * self._batch_seconds

    def _anchor(self, candidates: list[Job], now: float) -> Job:
        """The job a batch is built around: the oldest, or (shortest-first) the shortest while
        the oldest has waited less than the bound. Short inputs then no longer wait behind a
        batch of long ones, and a long input waits at most the bound before it goes next."""
        oldest = candidates[0]
        if self.shortest_first_s is None or now - oldest.enqueued_at >= self.shortest_first_s:
            return oldest
        return min(candidates, key=lambda job: job.tokens)  # the oldest of the shortest

    def _fits(self, batch: list[Job], job: Job) -> bool:
        longest = max(job.tokens, *(member.tokens for member in batch))
        padded = longest * (len(batch) + 1)
        if self.max_batch_tokens is not None and padded > self.max_batch_tokens:
            return False
        if self.order is Order.ARRIVAL:
            return True
        real = job.tokens + sum(member.tokens for member in batch)
        return real >= self.min_batch_fill * padded

    # --- after a batch ------------------------------------------------------------------------

    def finished(self, batch: list[Job], compute_seconds: float | None) -> None:
        """A batch handed out by next_batch is over; `compute_seconds` None if it never ran."""
        self.in_flight -= len(batch)
        if compute_seconds is not None and batch:
            self.batches += 1
            self.items += len(batch)
            rate = len(batch) / max(compute_seconds, 1e-6)
            previous = self._items_per_second
            self._items_per_second = rate if previous is None else (
                _RATE_SMOOTHING * rate + (1 - _RATE_SMOOTHING) * previous)
            seconds = self._batch_seconds
            self._batch_seconds = compute_seconds if seconds is None else (
                _BATCH_TIME_SMOOTHING * compute_seconds + (1 - _BATCH_TIME_SMOOTHING) * seconds)
        self._update_idle()

    def requeue(self, batch: Iterable[Job]) -> None:
        """Put jobs of a batch that never ran back at the head of the queue, in order."""
        jobs = list(batch)
        self.in_flight -= len(jobs)
        self._queue.extendleft(reversed(jobs))
        self._arrival.set()
        self._update_idle()

    def fail_queued(self, error_factory: Callable[[], BaseException]) -> int:
        """Answer every queued job with an error (no worker can take them); return how many."""
        failed = 0
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                failed += 1
            resolve(job, error=error_factory())
        self._update_idle()
        return failed

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around one request's whole life in the queue: between its windows nothing of it may be
        queued or running, yet a drain must wait for the rest of it."""
        self._open_requests += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._open_requests -= 1
            self._update_idle()

    def _update_idle(self) -> None:
        if not self._queue and self.in_flight == 0 and self._open_requests == 0:
            self._idle.set()
        else:
            self._idle.clear()

    async def wait_idle(self) -> None:
        """Until nothing is queued or running."""
        await self._idle.wait()
