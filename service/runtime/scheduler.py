"""The NPU scheduler: one executor thread runs every model step, highest priority first.

Work arrives as *steps* (a prefill chunk, a decode step, a vision encode), so a higher-priority request
preempts a lower one at the next step boundary instead of waiting for a whole answer. ONNX Runtime calls run
on the executor thread, never on the asyncio loop, and one at a time: the NPU (or the CPU EP's thread pool)
is a single resource, and interleaving two sessions only makes both slower.

Admission: each request takes a `Ticket` for its priority. Per priority at most `max_running` tickets hold a
running slot (a batch-1 decoder gains nothing from interleaving two chats, and each live sequence holds a KV
cache); the rest wait in a bounded FIFO, and a full FIFO raises `QueueFullError` (the gRPC layer answers
RESOURCE_EXHAUSTED). Queue time = admission until the request's first step starts on the executor.

Strict priority across step gaps: between two steps of the same request its coroutine is back on the asyncio
loop (detokenizing, sending), so the heap momentarily holds only lower-priority steps. The executor waits up to
`handoff_grace_s` for a started higher-priority ticket to submit its next step before it runs lower-priority
work; without that, safety and chat would alternate step by step instead of safety finishing first.

Priorities are *job classes*, not callers: the runtime knows what kind of work a request is (`JobClass`), and
each caller (a skill, the Assistant, the perception cascade) says which class its request belongs to. The
runtime never needs to know which skills exist.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import structlog

from service.rpc_errors import ExhaustedError
from service.runtime import metrics

log = structlog.get_logger(__name__)

class JobClass(StrEnum):
    """What a request is for, highest priority first. A caller passes its class; the scheduler ranks by it."""
    CRITICAL = "critical"        # someone may be in danger now (a child left behind, the safe-exit warning)
    ALERT = "alert"              # a security event judged while it happens (an intrusion at the parked car)
    INTERACTIVE = "interactive"  # a person at the car waits for a short reply (a greeting on approach)
    LOOKUP = "lookup"            # a person asked for something the car knows (where it is parked)
    CHAT = "chat"                # open questions and conversation; best effort


PRIORITIES: tuple[str, ...] = tuple(c.value for c in JobClass)   # the order is the rank
RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


def job_class(value: JobClass | str) -> JobClass:
    """A job class from its name; ValueError naming the known classes otherwise."""
    try:
        return JobClass(value)
    except ValueError:
        raise ValueError(f"unknown job class {value!r}; expected one of {', '.join(PRIORITIES)}") from None

T = TypeVar("T")


class QueueFullError(ExhaustedError, RuntimeError):
    """The waiting queue of a priority is full; the gRPC layer maps it to RESOURCE_EXHAUSTED."""

    def __init__(self, priority: str, limit: int):
        super().__init__(f"the {priority} queue is full ({limit} requests waiting); retry later")
        self.priority = priority
        self.limit = limit


class SchedulerClosedError(RuntimeError):
    """The scheduler was closed; no more work is accepted."""


@dataclass
class SchedulerConfig:
    # Waiting (not yet running) requests allowed per priority before RESOURCE_EXHAUSTED.
    queue_limits: dict[str, int] = field(default_factory=lambda: {
        "critical": 16, "alert": 16, "interactive": 16, "lookup": 16, "chat": 8})
    # Requests of one priority that may be in progress at once (each interleaves its steps).
    max_running: int = 1
    # How long the executor holds lower-priority steps back for a started higher-priority request
    # that is between two of its steps (see the module doc).
    handoff_grace_s: float = 0.02

    def validate(self) -> None:
        unknown = set(self.queue_limits) - set(PRIORITIES)
        if unknown:
            raise ValueError(f"queue_limits: unknown job classes {sorted(unknown)}; expected {list(PRIORITIES)}")
        for name in PRIORITIES:
            if self.queue_limits.get(name, 0) < 0:
                raise ValueError(f"queue_limits.{name}: must be >= 0, got {self.queue_limits[name]}")
        if self.max_running < 1:
            raise ValueError(f"max_running: must be >= 1, got {self.max_running}")
        if not 0 <= self.handoff_grace_s <= 1:
            raise ValueError(f"handoff_grace_s: must be within [0, 1] s, got {self.handoff_grace_s}")


class Ticket:
    """One request's place in the scheduler. Use `await ticket.step(fn, *args)` for each unit of model work."""

    def __init__(self, scheduler: NpuScheduler, priority: JobClass, request_id: str):
        self._scheduler = scheduler
        self.priority = priority   # the request's job class
        self.rank = RANK[priority]
        self.request_id = request_id
        self.admitted_at = time.monotonic()
        self.first_step_at: float | None = None  # set on the executor thread
        self.steps = 0
        self.pending = False     # a step of this ticket is in the heap or running
        self.released = False
        self.counted_waiting = False
        self.last_step_done = 0.0

    @property
    def queue_seconds(self) -> float:
        """Admission until the first step started (so far, if it has not started yet)."""
        return (self.first_step_at or time.monotonic()) - self.admitted_at

    async def step(self, fn: Callable[..., T], *args: Any, kind: str = "step") -> T:
        return await self._scheduler._enqueue(self, fn, args, kind)

    def submit(self, fn: Callable[..., T], *args: Any, kind: str = "step") -> asyncio.Future[T]:
        """Queue a step now and return its future (the caller may work on the loop meanwhile; cancelling the
        future before the step starts means the step never runs)."""
        return self._scheduler._enqueue(self, fn, args, kind)


@dataclass(order=True)
class _Job:
    rank: int
    seq: int
    ticket: Ticket = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple = field(compare=False)
    kind: str = field(compare=False)
    loop: asyncio.AbstractEventLoop | None = field(compare=False)   # None: a blocking caller's thread waits
    future: asyncio.Future | concurrent.futures.Future = field(compare=False)


class NpuScheduler:
    def __init__(self, config: SchedulerConfig | None = None, *, name: str = "npu",
                 on_busy: Callable[[float], None] | None = None):
        self.config = config or SchedulerConfig()
        self.config.validate()
        self.name = name
        self.on_busy = on_busy   # told the seconds of every step (the energy model's NPU busy time)
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._active: set[Ticket] = set()        # holding a running slot
        self._waiting: dict[str, int] = {p: 0 for p in PRIORITIES}
        self._running: dict[str, int] = {p: 0 for p in PRIORITIES}
        self._slot_waiters: dict[str, list[asyncio.Future]] = {p: [] for p in PRIORITIES}
        self._closed = False
        self.steps_total = 0   # every step run, for tests and the bench
        self._thread = threading.Thread(target=self._run, name=f"{name}-executor", daemon=True)
        self._thread.start()

    # ---- admission -------------------------------------------------------------------------------
    def waiting(self, priority: str) -> int:
        return self._waiting[priority]

    def running(self, priority: str) -> int:
        return self._running[priority]

    def admit(self, priority: JobClass | str, request_id: str = "") -> _Admission:
        """`async with scheduler.admit(JobClass.CHAT) as ticket:`; raises QueueFullError when that class's queue
        is full, ValueError for an unknown class."""
        priority = job_class(priority)
        if self._closed:
            raise SchedulerClosedError("the scheduler is closed")
        limit = self.config.queue_limits.get(priority, 0)
        if self._running[priority] >= self.config.max_running and self._waiting[priority] >= limit:
            metrics.REQUESTS.labels(priority, "rejected").inc()
            raise QueueFullError(priority, limit)
        return _Admission(self, Ticket(self, priority, request_id))

    async def _acquire(self, ticket: Ticket) -> None:
        p = ticket.priority
        self._waiting[p] += 1
        ticket.counted_waiting = True
        metrics.REQUESTS_WAITING.labels(p).inc()
        try:
            while self._running[p] >= self.config.max_running:
                waiter = asyncio.get_running_loop().create_future()
                self._slot_waiters[p].append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._slot_waiters[p]:
                        self._slot_waiters[p].remove(waiter)
        except BaseException:
            self._stop_waiting(ticket)
            self._wake_slot_waiter(p)   # a slot we were woken for must not be lost
            raise
        self._running[p] += 1
        metrics.REQUESTS_RUNNING.labels(p).inc()
        with self._cond:
            self._active.add(ticket)

    def _wake_slot_waiter(self, priority: str) -> None:
        for waiter in self._slot_waiters[priority]:
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, ticket: Ticket) -> None:
        p = ticket.priority
        self._stop_waiting(ticket)  # it may never have reached the executor
        with self._cond:
            ticket.released = True
            self._active.discard(ticket)
            self._cond.notify_all()
        self._running[p] -= 1
        metrics.REQUESTS_RUNNING.labels(p).dec()
        self._wake_slot_waiter(p)

    # ---- steps -----------------------------------------------------------------------------------
    def _enqueue(self, ticket: Ticket, fn: Callable[..., T], args: tuple, kind: str) -> asyncio.Future:
        if ticket.released:
            raise RuntimeError("step submitted on a released ticket")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._push(_Job(ticket.rank, next(self._seq), ticket, fn, args, kind, loop, future))
        return future

    def _push(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the scheduler is closed")
            job.ticket.pending = True
            heapq.heappush(self._heap, job)
            self._cond.notify_all()

    def run_blocking(self, priority: JobClass | str, fn: Callable[..., T], *args: Any, kind: str = "step") -> T:
        """Run one step from a worker thread (perception's analysis threads), waiting for its turn by job class;
        on the executor thread itself it just runs. Never call it on the event loop: it blocks its caller."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        ticket = Ticket(self, job_class(priority), "")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._push(_Job(ticket.rank, next(self._seq), ticket, fn, args, kind, None, done))
        try:
            return done.result()
        finally:
            ticket.released = True

    def _blocked_by_higher(self, job: _Job, now: float) -> float:
        """Seconds to hold `job` back for a started higher-priority ticket between steps (0: run it)."""
        hold = 0.0
        for other in self._active:
            if (other.rank < job.rank and other.first_step_at is not None and not other.pending
                    and not other.released):
                remaining = other.last_step_done + self.config.handoff_grace_s - now
                hold = max(hold, remaining)
        return hold

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed and not self._heap:
                        return
                    if not self._heap:
                        self._cond.wait()
                        continue
                    job = self._heap[0]
                    hold = self._blocked_by_higher(job, time.monotonic())
                    if hold > 0:
                        self._cond.wait(hold)
                        continue
                    heapq.heappop(self._heap)
                    break
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        ticket = job.ticket
        if job.future.cancelled():
            # The request was cancelled while this step waited: do not spend NPU time on it.
            with self._cond:
                ticket.pending = False
                ticket.last_step_done = time.monotonic()
            return
        started = time.monotonic()
        if ticket.first_step_at is None:
            ticket.first_step_at = started
            if job.loop is not None:
                job.loop.call_soon_threadsafe(self._mark_started, ticket)
        try:
            result, error = job.fn(*job.args), None
        except BaseException as exc:  # delivered to the awaiting coroutine
            result, error = None, exc
        done = time.monotonic()
        with self._cond:
            ticket.steps += 1
            self.steps_total += 1
            ticket.pending = False
            ticket.last_step_done = done
        metrics.NPU_STEPS.labels(ticket.priority, job.kind).inc()
        metrics.NPU_BUSY.labels(ticket.priority).inc(done - started)
        if self.on_busy is not None:
            self.on_busy(done - started)
        if job.loop is None:
            _settle(job.future, result, error)
            return
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        except RuntimeError:  # the loop closed under us (shutdown)
            pass

    def _mark_started(self, ticket: Ticket) -> None:
        if ticket.counted_waiting:
            metrics.QUEUE_TIME.labels(ticket.priority).observe(ticket.queue_seconds)
        self._stop_waiting(ticket)

    def _stop_waiting(self, ticket: Ticket) -> None:
        # Loop-thread only: the waiting count drops exactly once, at the first step or at release.
        if ticket.counted_waiting:
            ticket.counted_waiting = False
            self._waiting[ticket.priority] -= 1
            metrics.REQUESTS_WAITING.labels(ticket.priority).dec()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting work, finish queued steps, join the executor thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


def _settle(future: asyncio.Future | concurrent.futures.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Admission:
    def __init__(self, scheduler: NpuScheduler, ticket: Ticket):
        self._scheduler = scheduler
        self.ticket = ticket

    async def __aenter__(self) -> Ticket:
        await self._scheduler._acquire(self.ticket)
        return self.ticket

    async def __aexit__(self, *exc_info) -> None:
        self._scheduler._release(self.ticket)
