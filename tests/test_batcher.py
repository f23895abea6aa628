"""Batch formation and admission, in-process: pure asyncio, no processes, a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from pipeserve.front import errors
from pipeserve.front.batcher import Batcher, Dropped, Refused, resolve

FAR = 1e9  # a deadline that never passes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _submit(batcher: Batcher, items: list[str], key: str = "{}", deadline: float = FAR) -> list:
    return batcher.submit(items, {}, key, "req", deadline)


async def test_takes_what_is_queued_up_to_the_size_limit() -> None:
    batcher = Batcher(max_batch_size=4, max_batch_delay_s=0, max_queue=100)
    _submit(batcher, [f"i{n}" for n in range(6)])
    first = await batcher.next_batch()
    second = await batcher.next_batch()
    assert [job.input for job in first] == ["i0", "i1", "i2", "i3"]
    assert [job.input for job in second] == ["i4", "i5"]
    assert batcher.in_flight == 6


async def _settle() -> None:
    """Let every ready task run until it waits again (no time passes on the fake clock)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_waits_for_the_delay_counted_from_the_first_item() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=10, max_queue=100, clock=clock)
    _submit(batcher, ["a"])
    task = asyncio.ensure_future(batcher.next_batch())
    await _settle()
    assert not task.done()
    clock.now += 9.9
    _submit(batcher, ["b"])  # wakes the batcher, but 0.1 s of a's delay is left: keep waiting
    await _settle()
    assert not task.done()
    clock.now += 0.2
    _submit(batcher, ["c"])  # a's delay has passed: the batch closes with what is queued
    batch = await asyncio.wait_for(task, 1)
    assert [job.input for job in batch] == ["a", "b", "c"]


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=10, max_queue=100)
    _submit(batcher, ["a", "b"])
    batch = await asyncio.wait_for(batcher.next_batch(), 1)
    assert len(batch) == 2


async def test_an_old_first_item_closes_the_batch_at_once() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0.5, max_queue=100, clock=clock)
    _submit(batcher, ["a"])
    clock.now += 1.0  # it waited a whole batch's compute already
    batch = await asyncio.wait_for(batcher.next_batch(), 0.1)
    assert [job.input for job in batch] == ["a"]


async def test_only_jobs_with_the_first_jobs_parameters_share_a_batch() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0, max_queue=100)
    _submit(batcher, ["a"], key="A")
    _submit(batcher, ["b"], key="B")
    _submit(batcher, ["c"], key="A")
    first = await batcher.next_batch()
    second = await batcher.next_batch()
    assert [job.input for job in first] == ["a", "c"]
    assert [job.input for job in second] == ["b"]


async def test_cancelled_and_expired_jobs_are_dropped_and_counted() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0, max_queue=100, clock=clock)
    gone, = _submit(batcher, ["client went away"])
    late, = _submit(batcher, ["deadline passed"], deadline=clock.now + 1)
    _submit(batcher, ["live"])
    gone.future.cancel()
    clock.now += 2
    batch = await batcher.next_batch()
    assert [job.input for job in batch] == ["live"]
    assert batcher.dropped == {Dropped.DISCONNECTED: 1, Dropped.EXPIRED: 1}
    assert isinstance(late.future.exception(), errors.RequestTimeout)


async def test_admission_is_all_or_nothing_and_immediate() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0, max_queue=4)
    _submit(batcher, ["a", "b", "c"])
    with pytest.raises(errors.Overloaded) as refused:
        _submit(batcher, ["d", "e"])
    assert refused.value.status == 503 and refused.value.retry_after >= 1
    assert batcher.depth == 3
    _submit(batcher, ["d"])
    assert batcher.depth == 4


async def test_retry_after_follows_the_backlog_and_the_measured_rate() -> None:
    batcher = Batcher(max_batch_size=10, max_batch_delay_s=0, max_queue=1000)
    assert batcher.retry_after() == 1  # nothing measured yet
    _submit(batcher, ["x"] * 10)
    batch = await batcher.next_batch()
    batcher.finished(batch, compute_seconds=1.0)  # 10 items/s
    _submit(batcher, ["y"] * 95)
    assert batcher.retry_after() == 10  # 95 queued at 10/s
    _submit(batcher, ["z"] * 900)
    assert batcher.retry_after() == 60  # clamped


async def test_the_drain_rate_counts_every_worker() -> None:
    """Four workers each running 10 items/s drain 40/s: Retry-After and the deadline refusal
    predict from that, not from one worker's rate."""
    clock = Clock()
    batcher = Batcher(max_batch_size=10, max_batch_delay_s=0, max_queue=1000, clock=clock, workers=4)
    _submit(batcher, ["x"] * 10)
    batcher.finished(await batcher.next_batch(), compute_seconds=1.0)
    assert batcher.drain_rate() == 40
    _submit(batcher, ["y"] * 395)
    assert batcher.retry_after() == 10  # 395 queued at 40/s, not 40 s at 10/s
    _submit(batcher, ["z"], deadline=clock.now + 11)  # 396 at 40/s: met in ~10 s, so admitted
    with pytest.raises(errors.Overloaded, match="cannot drain"):
        _submit(batcher, ["w"], deadline=clock.now + 5)


async def test_a_request_whose_deadline_the_backlog_cannot_meet_is_refused() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=4, max_batch_delay_s=0, max_queue=1000, clock=clock)
    _submit(batcher, ["x"] * 4)
    batcher.finished(await batcher.next_batch(), compute_seconds=1.0)  # 4 items/s measured
    _submit(batcher, ["y"] * 8)  # 2 s of backlog
    with pytest.raises(errors.Overloaded, match="cannot drain before this request's deadline"):
        _submit(batcher, ["z"], deadline=clock.now + 1)
    assert batcher.refused == {Refused.DEADLINE: 1} and batcher.depth == 8
    _submit(batcher, ["z"], deadline=clock.now + 10)  # a deadline the backlog can meet
    assert batcher.depth == 9


async def test_closed_door_refuses_with_the_reason() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0, max_queue=10)
    batcher.close("the server is shutting down")
    with pytest.raises(errors.Unavailable, match="shutting down"):
        _submit(batcher, ["a"])


async def test_requeue_puts_jobs_back_first_in_order() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=0, max_queue=10)
    _submit(batcher, ["a", "b", "c"])
    batch = await batcher.next_batch()
    batcher.requeue(batch)
    assert batcher.in_flight == 0
    again = await batcher.next_batch()
    assert [job.input for job in again] == ["a", "b"]


async def test_fail_queued_answers_everyone_and_idle_follows() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=0, max_queue=10)
    jobs = _submit(batcher, ["a", "b"])
    assert batcher.fail_queued(lambda: errors.WorkerCrashed()) == 2
    assert all(isinstance(job.future.exception(), errors.WorkerCrashed) for job in jobs)
    await asyncio.wait_for(batcher.wait_idle(), 1)


async def test_resolve_ignores_settled_futures() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=0, max_queue=10)
    job, = _submit(batcher, ["a"])
    job.future.cancel()
    resolve(job, "late result")  # must not raise InvalidStateError
    assert job.future.cancelled()


async def test_a_cancelled_next_batch_loses_no_job() -> None:
    batcher = Batcher(max_batch_size=4, max_batch_delay_s=5, max_queue=10)
    _submit(batcher, ["a"])
    waiting = asyncio.ensure_future(batcher.next_batch())
    await _settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert batcher.depth == 1 and batcher.in_flight == 0


# --- length-aware batch formation -----------------------------------------------------------


def _text(tokens: int) -> str:
    return "x" * ((tokens - 2) * 4)  # estimate_tokens inverts this


async def test_length_order_groups_similar_lengths_around_the_oldest() -> None:
    batcher = Batcher(max_batch_size=3, max_batch_delay_s=0, max_queue=100)
    lengths = [40, 10, 130, 42, 11, 128, 39, 12]
    _submit(batcher, [_text(n) for n in lengths])
    sizes = []
    while batcher.depth:
        sizes.append(sorted(job.tokens for job in await batcher.next_batch()))
    assert sizes[0] == [39, 40, 42]  # the oldest (40) and its nearest neighbours
    assert sizes[1] == [10, 11, 12]
    assert sizes[2] == [128, 130]


async def test_the_oldest_job_always_goes_in_the_next_batch() -> None:
    batcher = Batcher(max_batch_size=4, max_batch_delay_s=0, max_queue=100)
    _submit(batcher, [_text(200)] + [_text(10)] * 8)
    first = await batcher.next_batch()
    assert first[0].tokens == 200
    assert len(first) == 1  # padding 10-token texts to 200 would waste most of the batch


async def test_shortest_first_serves_short_inputs_until_the_oldest_has_waited_the_bound() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=0, max_queue=100, shortest_first_s=0.5, clock=clock)
    _submit(batcher, [_text(120), _text(118)])  # the oldest: long
    clock.now += 0.1
    _submit(batcher, [_text(10), _text(12), _text(11), _text(13)])
    first = await batcher.next_batch()
    assert sorted(job.tokens for job in first) == [10, 11]  # the shortest, and its neighbour
    clock.now += 0.4  # the long ones have now waited 0.5 s: the bound
    second = await batcher.next_batch()
    assert sorted(job.tokens for job in second) == [118, 120]
    third = await batcher.next_batch()
    assert sorted(job.tokens for job in third) == [12, 13]


@pytest.mark.parametrize("window_batches", [None, 2.0])
async def test_a_batch_window_keeps_younger_jobs_from_overtaking_the_oldest(window_batches: float | None) -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=3, max_batch_delay_s=0, max_queue=100, window_batches=window_batches,
                      clock=clock)
    _submit(batcher, ["x"])
    batcher.finished(await batcher.next_batch(), compute_seconds=0.05)  # batches take 0.05 s
    if window_batches is not None:
        assert batcher.window_s() == pytest.approx(0.1)  # 2 batch times
    _submit(batcher, [_text(40)])  # the oldest
    clock.now += 0.05
    _submit(batcher, [_text(10), _text(41)])  # within 0.1 s of it
    clock.now += 0.15
    _submit(batcher, [_text(39), _text(42)])  # 0.2 s after it
    batches = []
    while batcher.depth:
        batches.append(sorted(job.tokens for job in await batcher.next_batch()))
    if window_batches is None:  # the young 39 or 42 joins the oldest's batch; the older 10 waits
        assert len(batches[0]) == 3 and batches[0][1:] in ([40, 41], [40, 42], [39, 40])
    else:  # only what arrived within the window of each batch's oldest job
        assert batches == [[40, 41], [10], [39, 42]]


async def test_the_batch_window_follows_the_measured_batch_time() -> None:
    batcher = Batcher(max_batch_size=4, max_batch_delay_s=0, max_queue=100, window_batches=3.0)
    assert batcher.window_s() is None  # no batch measured yet: no window
    _submit(batcher, ["a"])
    batcher.finished(await batcher.next_batch(), compute_seconds=0.1)
    assert batcher.window_s() == pytest.approx(0.3)
    for _ in range(200):  # the model got faster: the window follows, smoothed
        _submit(batcher, ["a"])
        batcher.finished(await batcher.next_batch(), compute_seconds=0.01)
    assert batcher.window_s() == pytest.approx(0.03, rel=0.01)


async def test_token_budget_caps_padded_size() -> None:
    batcher = Batcher(max_batch_size=32, max_batch_delay_s=0, max_queue=100, max_batch_tokens=400)
    _submit(batcher, [_text(100)] * 10)
    assert len(await batcher.next_batch()) == 4  # 4 x 100 padded tokens


async def test_arrival_order_is_first_come_first_batched() -> None:
    batcher = Batcher(max_batch_size=3, max_batch_delay_s=0, max_queue=100, order="arrival")
    _submit(batcher, [_text(n) for n in (40, 10, 130, 42)])
    assert [job.tokens for job in await batcher.next_batch()] == [40, 10, 130]


async def test_every_dropped_job_is_counted_once_whatever_its_parameters() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_delay_s=0, max_queue=100)
    _submit(batcher, ["live"], key="A")
    gone_b, = _submit(batcher, ["b"], key="B")
    gone_a, = _submit(batcher, ["a"], key="A")
    gone_a.future.cancel()
    gone_b.future.cancel()
    assert [job.input for job in await batcher.next_batch()] == ["live"]
    assert batcher.dropped == {Dropped.DISCONNECTED: 1}
    assert batcher.depth == 1  # B's cancelled job waits until a batch meets it...
    waiting = asyncio.ensure_future(batcher.next_batch())
    await asyncio.sleep(0)
    assert batcher.dropped == {Dropped.DISCONNECTED: 2} and batcher.depth == 0  # ...and counts it
    waiting.cancel()
