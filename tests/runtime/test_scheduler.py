"""The NPU scheduler on its own: one executor thread, strict job-class priorities at step boundaries, bounded
queues. Events are ordered by conditions the test waits for (a slot held, a waiter counted), never by sleeps."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.runtime.scheduler import JobClass, NpuScheduler, QueueFullError, SchedulerConfig


@pytest.fixture
def scheduler():
    s = NpuScheduler(SchedulerConfig(queue_limits={c: 2 for c in JobClass} | {JobClass.CHAT: 1}))
    yield s
    s.close()


def _busy(seconds: float) -> str:
    # Stands in for an ORT call: it blocks its thread, as session.run does.
    time.sleep(seconds)
    return threading.current_thread().name


async def _until(condition, what: str, timeout: float = 5.0) -> None:
    """Yield to the loop until `condition()` holds (the scheduler's own counters), failing after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def _hold(scheduler: NpuScheduler, gate: threading.Event, job: JobClass = JobClass.CHAT) -> None:
    """One request whose single step blocks the executor until `gate` is set."""
    async with scheduler.admit(job) as ticket:
        await ticket.step(gate.wait)


async def test_steps_run_on_one_executor_thread_off_the_loop(scheduler):
    async with scheduler.admit(JobClass.CHAT) as ticket:
        names = [await ticket.step(_busy, 0.001) for _ in range(3)]
    assert set(names) == {"npu-executor"}
    assert threading.current_thread().name != "npu-executor"
    assert ticket.steps == 3 and ticket.first_step_at is not None


async def test_critical_preempts_a_running_chat_at_step_boundaries(scheduler):
    order: list[str] = []

    async def run(job: JobClass, steps: int, started: asyncio.Event | None = None):
        async with scheduler.admit(job) as ticket:
            for i in range(steps):
                await ticket.step(_busy, 0.005)
                order.append(job)
                if started is not None and i == 2:
                    started.set()

    chat_started = asyncio.Event()
    chat = asyncio.create_task(run(JobClass.CHAT, 40, chat_started))
    await chat_started.wait()
    chat_steps_before = order.count(JobClass.CHAT)
    await run(JobClass.CRITICAL, 10)
    # Between the critical request's first and last step, chat ran at most the one step already in flight.
    first, last = order.index(JobClass.CRITICAL), len(order) - 1 - order[::-1].index(JobClass.CRITICAL)
    assert order[first:last + 1].count(JobClass.CHAT) == 0
    assert order.count(JobClass.CHAT) <= chat_steps_before + 1
    await chat
    assert order.count(JobClass.CHAT) == 40


async def test_queued_steps_run_in_job_class_order(scheduler):
    """With the executor blocked, one waiting step per class: they run highest class first, whatever the
    order they were submitted in."""
    gate, ran = threading.Event(), []
    blocker = asyncio.create_task(_hold(scheduler, gate, JobClass.CRITICAL))
    await _until(lambda: scheduler.running(JobClass.CRITICAL) == 1 and scheduler.waiting(JobClass.CRITICAL) == 0,
                 "the blocking step to start")

    queued: list[JobClass] = []

    async def one(job: JobClass):
        async with scheduler.admit(job) as ticket:
            step = ticket.submit(ran.append, job)
            queued.append(job)
            await step

    submitted = [JobClass.CHAT, JobClass.LOOKUP, JobClass.ALERT, JobClass.INTERACTIVE]
    tasks = [asyncio.create_task(one(j)) for j in submitted]
    await _until(lambda: len(queued) == len(submitted), "every class to queue its step")
    gate.set()
    await asyncio.gather(blocker, *tasks)
    assert ran == [JobClass.ALERT, JobClass.INTERACTIVE, JobClass.LOOKUP, JobClass.CHAT]


async def test_full_queue_raises_queue_full_and_frees_on_release(scheduler):
    gate = threading.Event()
    running = asyncio.create_task(_hold(scheduler, gate))
    await _until(lambda: scheduler.running("chat") == 1 and scheduler.waiting("chat") == 0,
                 "the first chat's step to start")
    waiting = asyncio.create_task(_hold(scheduler, gate))          # fills the chat queue (limit 1)
    await _until(lambda: scheduler.waiting("chat") == 1, "the second chat to wait")
    with pytest.raises(QueueFullError, match="chat queue is full"):
        scheduler.admit(JobClass.CHAT)
    critical = scheduler.admit(JobClass.CRITICAL)           # other classes have their own queues
    gate.set()
    async with critical as ticket:
        assert await ticket.step(lambda: 42) == 42
    await asyncio.gather(running, waiting)
    assert scheduler.waiting("chat") == 0 and scheduler.running("chat") == 0


async def test_queue_time_is_measured_and_cancelled_waiters_leave_cleanly(scheduler):
    gate = threading.Event()
    first = asyncio.create_task(_hold(scheduler, gate))
    await _until(lambda: scheduler.running("chat") == 1 and scheduler.waiting("chat") == 0,
                 "the first chat's step to start")
    second = asyncio.create_task(_hold(scheduler, gate))
    await _until(lambda: scheduler.waiting("chat") == 1, "the second chat to wait")
    second.cancel()                                # a client gave up while queued
    with pytest.raises(asyncio.CancelledError):
        await second
    assert scheduler.waiting("chat") == 0
    gate.set()
    await first
    async with scheduler.admit(JobClass.CHAT) as ticket:
        await asyncio.sleep(0.05)                  # preprocessing before the first step counts as queue time
        await ticket.step(lambda: None)
    assert ticket.queue_seconds >= 0.05


async def test_step_errors_reach_the_caller(scheduler):
    def boom():
        raise ValueError("bad graph input")
    async with scheduler.admit(JobClass.INTERACTIVE) as ticket:
        with pytest.raises(ValueError, match="bad graph input"):
            await ticket.step(boom)
        assert await ticket.step(lambda: "still works") == "still works"


async def test_unknown_job_class_is_refused_with_the_known_ones(scheduler):
    with pytest.raises(ValueError, match="unknown job class 'sentinel'; expected one of critical, alert"):
        scheduler.admit("sentinel")    # a skill's name is not a class: the runtime does not know skills
    async with scheduler.admit("lookup") as ticket:   # a class by its name (config, metrics labels)
        assert ticket.priority is JobClass.LOOKUP


def test_config_validation():
    with pytest.raises(ValueError, match="queue_limits: unknown"):
        SchedulerConfig(queue_limits={"vip": 1}).validate()
    with pytest.raises(ValueError, match="max_running"):
        SchedulerConfig(max_running=0).validate()


async def test_a_worker_thread_step_waits_its_turn_by_class_and_reports_busy_time():
    """Perception's analysis threads submit blocking steps: a CRITICAL one overtakes queued chat steps, and
    every step's seconds reach the energy model's busy-time observer."""
    busy: list[float] = []
    scheduler = NpuScheduler(on_busy=busy.append)
    gate, ran = threading.Event(), []
    try:
        blocker = asyncio.create_task(_hold(scheduler, gate, JobClass.CHAT))
        await _until(lambda: scheduler.running(JobClass.CHAT) == 1 and scheduler.waiting(JobClass.CHAT) == 0,
                     "the blocking chat step to start")
        queued = []

        async def chat():
            async with scheduler.admit(JobClass.LOOKUP) as ticket:
                step = ticket.submit(ran.append, "lookup")
                queued.append(1)
                await step
        lookup = asyncio.create_task(chat())
        await _until(lambda: queued, "the lookup step to queue")
        worker = asyncio.create_task(asyncio.to_thread(
            scheduler.run_blocking, JobClass.CRITICAL, ran.append, "critical-perception", kind="perception.faces"))
        await _until(lambda: len(scheduler._heap) == 2, "the worker's step to queue")
        gate.set()
        await asyncio.gather(blocker, lookup, worker)
    finally:
        scheduler.close()
    assert ran == ["critical-perception", "lookup"]
    assert len(busy) == 3 and all(seconds >= 0 for seconds in busy)
    with pytest.raises(ValueError, match="unknown job class"):
        scheduler.run_blocking("safety", print)
