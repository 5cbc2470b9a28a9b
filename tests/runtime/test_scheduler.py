"""The NPU scheduler on its own: one executor thread, strict priorities at step boundaries, bounded queues."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.runtime.scheduler import NpuScheduler, QueueFullError, SchedulerConfig


@pytest.fixture
def scheduler():
    s = NpuScheduler(SchedulerConfig(queue_limits={"safety": 2, "sentinel": 2, "greeter": 2, "car_finder": 2,
                                                   "chat": 1}))
    yield s
    s.close()


def _busy(seconds: float) -> str:
    # Stands in for an ORT call: it blocks its thread, as session.run does.
    time.sleep(seconds)
    return threading.current_thread().name


async def test_steps_run_on_one_executor_thread_off_the_loop(scheduler):
    async with scheduler.admit("chat") as ticket:
        names = [await ticket.step(_busy, 0.001) for _ in range(3)]
    assert set(names) == {"npu-executor"}
    assert threading.current_thread().name != "npu-executor"
    assert ticket.steps == 3 and ticket.first_step_at is not None


async def test_safety_preempts_a_running_chat_at_step_boundaries(scheduler):
    order: list[str] = []

    async def run(priority: str, steps: int, started: asyncio.Event | None = None):
        async with scheduler.admit(priority) as ticket:
            for i in range(steps):
                await ticket.step(_busy, 0.005)
                order.append(priority)
                if started is not None and i == 2:
                    started.set()

    chat_started = asyncio.Event()
    chat = asyncio.create_task(run("chat", 40, chat_started))
    await chat_started.wait()
    chat_steps_before = order.count("chat")
    await run("safety", 10)
    # Between the safety request's first and last step, chat ran at most the one step already in flight.
    first, last = order.index("safety"), len(order) - 1 - order[::-1].index("safety")
    assert order[first:last + 1].count("chat") == 0
    assert order.count("chat") <= chat_steps_before + 1
    await chat
    assert order.count("chat") == 40


async def test_full_queue_raises_queue_full_and_frees_on_release(scheduler):
    gate = threading.Event()
    async def hold():
        async with scheduler.admit("chat") as ticket:
            await ticket.step(gate.wait)
    running = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(hold())          # fills the chat queue (limit 1)
    await asyncio.sleep(0.05)
    assert scheduler.waiting("chat") == 1
    with pytest.raises(QueueFullError, match="chat queue is full"):
        scheduler.admit("chat")
    safety = scheduler.admit("safety")           # other priorities have their own queues
    gate.set()
    async with safety as ticket:
        assert await ticket.step(lambda: 42) == 42
    await asyncio.gather(running, waiting)
    assert scheduler.waiting("chat") == 0 and scheduler.running("chat") == 0


async def test_queue_time_is_measured_and_cancelled_waiters_leave_cleanly(scheduler):
    gate = threading.Event()
    async def hold():
        async with scheduler.admit("chat") as ticket:
            await ticket.step(gate.wait)
    first = asyncio.create_task(hold())
    await asyncio.sleep(0.02)
    second = asyncio.create_task(hold())
    await asyncio.sleep(0.02)
    second.cancel()                                # a client gave up while queued
    with pytest.raises(asyncio.CancelledError):
        await second
    assert scheduler.waiting("chat") == 0
    gate.set()
    await first
    async with scheduler.admit("chat") as ticket:
        await asyncio.sleep(0.05)                  # preprocessing before the first step counts as queue time
        await ticket.step(lambda: None)
    assert ticket.queue_seconds >= 0.05


async def test_step_errors_reach_the_caller(scheduler):
    def boom():
        raise ValueError("bad graph input")
    async with scheduler.admit("greeter") as ticket:
        with pytest.raises(ValueError, match="bad graph input"):
            await ticket.step(boom)
        assert await ticket.step(lambda: "still works") == "still works"


def test_config_validation():
    with pytest.raises(ValueError, match="queue_limits: unknown"):
        SchedulerConfig(queue_limits={"vip": 1}).validate()
    with pytest.raises(ValueError, match="max_running"):
        SchedulerConfig(max_running=0).validate()
