"""The supervisor and dispatcher in-process, with small torch-free children (tests/children.py).

Each test runs the real Supervisor, WorkerProcess and Batcher on the test's event loop, with a
real spawned child speaking the real protocol; only the model is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockingError

from children import GATE_ENV
from pipeserve.front import errors
from pipeserve.front.batcher import Batcher, Job
from pipeserve.front.config import Config, load_config
from pipeserve.front.dispatch import Dispatcher
from pipeserve.front.supervisor import Backoff, Supervisor
from pipeserve.front.worker import WorkerDied
from pipeserve.ipc import ExitCode, WorkerState

FAR = 1e12
WAIT_S = 30.0


async def poll(predicate: Callable[[], bool]) -> None:
    """For what no event announces: check every 10 ms, fail after WAIT_S."""
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), WAIT_S)


class Slot:
    """One Supervisor on this loop, with what it reported when it gave up."""

    def __init__(self, child: str, backoff: Backoff | None = None, **settings: Any) -> None:
        self.config = Config(pipeline="unused:unused", **settings)
        self.batcher = Batcher(self.config.max_batch_size, 0, self.config.max_queue)
        self.fatal: list[tuple[ExitCode, str]] = []
        self.changed = asyncio.Event()
        self.supervisor = Supervisor(0, self.config, "", self.batcher,
                                     lambda code, reason: self.fatal.append((code, reason)),
                                     lambda: False, on_change=self.changed.set,
                                     entry_point=f"children:{child}", backoff=backoff)
        self.task = asyncio.create_task(self.supervisor.run())

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait, on state changes, until `predicate` holds (or fail after WAIT_S)."""
        async def wait() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), WAIT_S)

    async def ready(self) -> None:
        await self.until(lambda: self.supervisor.state is WorkerState.READY)

    def submit(self, *inputs: str, parameters: dict[str, Any] | None = None) -> list[Job]:
        parameters = parameters or {}
        return self.batcher.submit(list(inputs), parameters, repr(sorted(parameters.items())), "test", FAR)

    async def result(self, job: Job) -> Any:
        return await asyncio.wait_for(job.future, WAIT_S)

    async def close(self) -> None:
        await self.supervisor.stop()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def slots() -> AsyncIterator[Callable[..., Slot]]:
    made: list[Slot] = []

    def make(child: str, backoff: Backoff | None = None, **settings: Any) -> Slot:
        made.append(Slot(child, backoff, **settings))
        return made[-1]

    yield make
    for slot in made:
        await slot.close()


async def test_serves_batches_and_settles_each_job(slots: Callable[..., Slot]) -> None:
    slot = slots("echo")
    await slot.ready()
    jobs = slot.submit("a", "b", "BAD", parameters={"suffix": "!"})
    assert await slot.result(jobs[0]) == "a!" and await slot.result(jobs[1]) == "b!"
    with pytest.raises(errors.BadRequest, match="bad input"):
        await slot.result(jobs[2])
    assert slot.supervisor.dispatcher.pipeline_calls == 1 and slot.batcher.in_flight == 0


async def test_a_crash_fails_exactly_its_batch_and_the_worker_restarts(slots: Callable[..., Slot]) -> None:
    slot = slots("echo", backoff=Backoff(initial=0.01))
    await slot.ready()
    first_pid = slot.supervisor.worker.pid  # type: ignore[union-attr]
    (crashing,) = slot.submit("CRASH")
    with pytest.raises(errors.WorkerCrashed):
        await slot.result(crashing)
    await slot.until(lambda: slot.supervisor.restarts == 1 and slot.supervisor.serving)
    assert slot.supervisor.worker.pid != first_pid  # type: ignore[union-attr]
    assert slot.supervisor.last_exit == "exited with code 9"
    assert await slot.result(slot.submit("after")[0]) == "after"


async def test_a_fatal_load_gives_up_with_its_reason(slots: Callable[..., Slot]) -> None:
    slot = slots("fatal")
    await asyncio.wait_for(slot.task, WAIT_S)
    assert slot.fatal == [(ExitCode.LOAD_FAILED, "cannot load model 'x': weights are corrupt")]
    assert slot.supervisor.state is WorkerState.FAILED


async def test_dying_before_ready_is_a_load_failure(slots: Callable[..., Slot]) -> None:
    slot = slots("die_loading")
    await asyncio.wait_for(slot.task, WAIT_S)
    ((code, reason),) = slot.fatal
    assert code is ExitCode.LOAD_FAILED and "exited with code 5 while loading" in reason


async def test_a_wrong_protocol_version_is_refused_as_a_load_failure(slots: Callable[..., Slot]) -> None:
    slot = slots("wrong_protocol")
    await asyncio.wait_for(slot.task, WAIT_S)
    ((code, reason),) = slot.fatal
    assert code is ExitCode.LOAD_FAILED and "protocol" in reason


async def test_a_garbage_frame_kills_the_worker_and_fails_its_batch(
        slots: Callable[..., Slot], caplog: pytest.LogCaptureFixture) -> None:
    slot = slots("garbage_frame", backoff=Backoff(initial=30))
    await slot.ready()
    (job,) = slot.submit("x")
    with pytest.raises(errors.WorkerCrashed):
        await slot.result(job)
    assert "sent a bad frame" in caplog.text
    assert slot.supervisor.last_exit == "killed by the front with SIGKILL (it sent a bad frame)"  # not "out of memory?"


async def test_a_reply_for_an_unknown_batch_is_logged_and_ignored(
        slots: Callable[..., Slot], caplog: pytest.LogCaptureFixture) -> None:
    slot = slots("unknown_batch_id")
    await slot.ready()
    assert await slot.result(slot.submit("x")[0]) == "x"
    assert "answered unknown batch" in caplog.text
    assert slot.supervisor.serving


async def test_a_slow_load_is_loading_until_the_child_is_released(
        slots: Callable[..., Slot], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "gate"
    monkeypatch.setenv(GATE_ENV, str(gate))  # the spawned child inherits it
    slot = slots("slow_load")
    await poll(lambda: slot.supervisor.worker is not None and slot.supervisor.worker.pid is not None)
    for _ in range(20):  # the child is up and blocked: the state must not move on its own
        await asyncio.sleep(0)
    assert slot.supervisor.state is WorkerState.LOADING
    gate.touch()
    await slot.ready()


async def test_a_hung_batch_is_killed_at_the_batch_timeout(slots: Callable[..., Slot]) -> None:
    slot = slots("echo", Backoff(initial=0.01), batch_timeout=0.5)
    await slot.ready()
    (job,) = slot.submit("HANG")
    with pytest.raises(errors.BatchTimedOut):
        await slot.result(job)
    await slot.until(lambda: slot.supervisor.restarts == 1 and slot.supervisor.serving)
    assert "SIGKILL" in (slot.supervisor.last_exit or "")


async def test_deaths_past_max_restarts_give_up(slots: Callable[..., Slot]) -> None:
    slot = slots("echo", Backoff(initial=0.01), max_restarts=1)
    for _ in range(2):
        await slot.ready()
        with pytest.raises(errors.WorkerCrashed):
            await slot.result(slot.submit("CRASH")[0])
    await asyncio.wait_for(slot.task, WAIT_S)
    ((code, reason),) = slot.fatal
    assert code is ExitCode.CRASH_LOOP and "died 2 times" in reason


async def test_a_worker_that_ignores_shutdown_is_killed(slots: Callable[..., Slot]) -> None:
    slot = slots("ignore_shutdown")
    await slot.ready()
    worker = slot.supervisor.worker
    assert worker is not None
    await asyncio.wait_for(worker.stop(grace=0.2), WAIT_S)
    assert worker.exited is not None and worker.exited.done()
    assert "SIGKILL" in worker.exited.result().cause


class _DeadBeforeSend:
    """A worker whose pipe is already gone: run() fails before the batch is written."""

    pid = 1
    exited: asyncio.Future[WorkerDied] | None = None

    async def run(self, batch: Any, timeout: float) -> Any:
        raise WorkerDied("killed by SIGKILL", -9, sent=False)


async def test_a_batch_formed_but_never_sent_goes_back_to_the_head_of_the_queue() -> None:
    batcher = Batcher(max_batch_size=2, max_batch_delay_s=0, max_queue=10)
    jobs = batcher.submit(["a", "b", "c"], {}, "{}", "test", FAR)
    dispatcher = Dispatcher(0, batcher, 2, 10.0, lambda: 1)
    batch = await batcher.next_batch()
    died = await dispatcher._run(_DeadBeforeSend(), batch, lambda: None)  # type: ignore[arg-type]
    assert died is not None and not died.sent
    assert not any(job.future.done() for job in jobs)  # nobody was failed
    assert batcher.in_flight == 0 and batcher.depth == 3
    assert [job.input for job in await batcher.next_batch()] == ["a", "b"]  # back first, in order


async def test_the_blocking_call_guard_is_on_for_async_tests() -> None:
    # Building the parser stats files: fine before the loop starts, a stall on it.
    with pytest.raises(BlockingError):
        load_config([], environ={})


async def test_a_load_past_the_load_timeout_gives_up_with_its_own_exit_code(
        slots: Callable[..., Slot], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GATE_ENV, str(tmp_path / "never"))
    slot = slots("slow_load", load_timeout=0.3)  # its gate is never opened
    await asyncio.wait_for(slot.task, WAIT_S)
    ((code, reason),) = slot.fatal
    assert code is ExitCode.LOAD_TIMEOUT and "did not load within --load-timeout 0.3s" in reason
    assert slot.supervisor.worker is not None and slot.supervisor.worker.exited is not None
    died = await asyncio.wait_for(asyncio.shield(slot.supervisor.worker.exited), WAIT_S)
    assert "SIGKILL" in died.cause  # the hung load was killed, not left behind


async def test_deaths_after_serving_do_not_count_toward_the_crash_loop_budget(slots: Callable[..., Slot]) -> None:
    slot = slots("echo", Backoff(initial=0.01), max_restarts=1)
    for restarts in range(4):  # four deaths, each after a completed batch: never a crash loop
        await slot.until(lambda: slot.supervisor.serving)
        assert await slot.result(slot.submit("served")[0]) == "served"
        with pytest.raises(errors.WorkerCrashed):
            await slot.result(slot.submit("CRASH")[0])
        await slot.until(lambda n=restarts: slot.supervisor.restarts == n + 1)
    assert slot.fatal == []
    await slot.until(lambda: slot.supervisor.serving)
    # Each restart took the initial delay (the backoff was reset): one step past it, not 2**4.
    assert slot.supervisor._backoff.next_delay() == 0.02


def test_backoff_doubles_to_its_ceiling_and_resets() -> None:
    backoff = Backoff(initial=0.5, maximum=4)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    backoff.reset()
    assert backoff.next_delay() == 0.5


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeserve")


class _DrainingWorker:
    """Just what Dispatcher.serve reads of a worker: one that turns draining (past
    --max-worker-memory) while the dispatcher waits for its next batch."""

    pid = 1

    def __init__(self) -> None:
        self.exited: asyncio.Future[WorkerDied] = asyncio.get_running_loop().create_future()
        self.draining = False
        self.sent: list[Any] = []

    def takes_new_work(self) -> bool:
        return not self.draining

    async def run(self, batch: Any, timeout: float) -> Any:
        self.sent.append(batch)
        raise AssertionError("a batch was sent to a draining worker")


async def test_a_batch_formed_as_its_worker_turns_draining_goes_back_to_the_queue() -> None:
    """The front may have sent Retire already: a batch written after it would be lost to the
    exit and answered as a crash. It waits in the queue for the restarted worker instead."""
    batcher = Batcher(max_batch_size=4, max_batch_delay_s=0, max_queue=100)
    dispatcher = Dispatcher(0, batcher, 4, WAIT_S, lambda: 1)
    worker = _DrainingWorker()
    serving = asyncio.ensure_future(dispatcher.serve(worker, lambda: None))  # type: ignore[arg-type]
    for _ in range(5):
        await asyncio.sleep(0)  # the dispatcher now waits for a batch
    worker.draining = True  # a Step said so meanwhile
    batcher.submit(["queued"], {}, "{}", "req", FAR)
    await poll(lambda: batcher.depth == 1 and batcher.in_flight == 0 and not serving.done())
    assert worker.sent == []
    worker.exited.set_result(WorkerDied("retired", ExitCode.MEMORY_LIMIT))
    assert (await asyncio.wait_for(serving, WAIT_S)).exitcode == ExitCode.MEMORY_LIMIT
    assert [job.input for job in await batcher.next_batch()] == ["queued"]
