"""The safety lane preempts slower work on a CPU host: its worker runs real-time (SCHED_FIFO) where the OS
permits, else SAFETY_BOOST nice steps above the process, else at the process's priority; the general lane runs
at the process's own, and the safety lane analyses on its own detector sessions. Threads a raised thread
starts (ONNX Runtime's pools) inherit the raise; a shared model the lane opens, and a worker process spawned
from a raised thread, do not."""
from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from service import thread_priority
from service.thread_priority import (SAFETY_BOOST, at_process_priority, nice_of, raise_current_thread,
                                     realtime_of, reset_inherited_priority)
from tests.skills.scenes import photo
from tests.skills.test_safety_lane import ScriptedHub, frame

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")


def in_thread(fn):
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def priority() -> tuple[bool, int]:
    return realtime_of(), nice_of()


def realtime_permitted() -> bool:
    return in_thread(lambda: raise_current_thread() and realtime_of())


def raised_priority(base: int) -> tuple[bool, int]:
    """What a raised thread runs at here: real-time, else nice-raised (root or RLIMIT_NICE), else unchanged."""
    if realtime_permitted():
        return True, base
    thread_priority.use_realtime(False)
    try:
        nice_raised = in_thread(raise_current_thread)
    finally:
        thread_priority.use_realtime(True)
    return False, max(-20, base - SAFETY_BOOST) if nice_raised else base


@pytest.fixture
def nice_only():
    thread_priority.use_realtime(False)
    yield
    thread_priority.use_realtime(True)


def new_threads(before: set[str]) -> list[int]:
    return [int(t) for t in set(os.listdir("/proc/self/task")) - before]


def test_a_raised_thread_and_the_threads_it_starts_run_above_the_process():
    base = nice_of()

    def raise_then_start_one():
        raise_current_thread()
        return priority(), in_thread(priority)

    own, child = in_thread(raise_then_start_one)
    assert own == child == raised_priority(base)
    assert priority() == (False, base)            # the caller itself is untouched


def test_without_real_time_the_raise_is_in_nice_steps(nice_only):
    base = nice_of()
    raised, own = in_thread(lambda: (raise_current_thread(), priority()))
    assert own == (False, max(-20, base - SAFETY_BOOST) if raised else base)


def test_a_block_at_the_process_priority_starts_normal_threads_and_the_raise_comes_back():
    base = nice_of()

    def raised_block():
        raise_current_thread()
        before = priority()
        with at_process_priority():
            inside, started = priority(), in_thread(priority)
        return before, inside, started, priority()

    before, inside, started, after = in_thread(raised_block)
    assert before == after == raised_priority(base)
    assert inside == started == (False, base)


def test_a_process_spawned_from_a_raised_thread_resets_itself():
    base = nice_of()

    def raised_then_reset():
        raise_current_thread()
        reset_inherited_priority(os.getpid())     # what the identity worker does first, in its own process
        return priority()

    assert in_thread(raised_then_reset) == (False, base)


class PriorityRecordingCascade:
    """The real cascade; notes each lane's thread priority and the object detector it was handed."""

    def __init__(self, cascade):
        self.cascade, self.seen = cascade, {}

    def __getattr__(self, name):
        return getattr(self.cascade, name)

    def analyze(self, bgr, meta, skip=(), job=None, models=None):
        self.seen[meta.camera_id] = (priority(), (models or self.cascade.model)("objects"))
        return self.cascade.analyze(bgr, meta, skip, job, models)


async def test_the_safety_lane_runs_raised_on_its_own_sessions_and_the_general_lane_unchanged():
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    from service.pipeline import AnalysisPipeline
    build(quantize=False, progress=lambda line: None)
    cascade = PriorityRecordingCascade(Cascade(PerceptionConfig()))
    hub = ScriptedHub()
    pipeline = AnalysisPipeline(hub, cascade, lane_of=lambda f: "safety" if f.camera_id == "ext-left" else "general")
    side = photo("dog.jpg")
    stream = pipeline.analyses()
    hub.queue.put_nowait(frame("ext-front", "exterior", "front", 10.0, side))
    hub.queue.put_nowait(frame("ext-left", "exterior", "left", 10.0, side))
    got = [await asyncio.wait_for(stream.__anext__(), 60) for _ in range(2)]
    await stream.aclose()
    assert {a.camera_id for a in got} == {"ext-front", "ext-left"}
    base = nice_of()
    general_priority, general_detector = cascade.seen["ext-front"]
    safety_priority, safety_detector = cascade.seen["ext-left"]
    assert general_priority == (False, base)
    assert safety_priority == raised_priority(base)
    assert general_detector is cascade.cascade.model("objects")
    assert safety_detector is not general_detector     # its own session, opened on the safety lane's thread
    left = next(a for a in got if a.camera_id == "ext-left")
    assert any(d.label == "bicycle" for d in left.detections)


def test_the_lanes_own_sessions_pool_threads_are_raised_and_a_shared_models_are_not():
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    build(quantize=False, progress=lambda line: None)
    cascade = Cascade(PerceptionConfig(threads=2))
    base, lane = nice_of(), cascade.lane_models(2)   # the lane's sessions live as long as `lane`

    def open_from_a_raised_thread(name):
        raise_current_thread()
        before = set(os.listdir("/proc/self/task"))
        lane(name)
        return new_threads(before)

    own_pool = in_thread(lambda: open_from_a_raised_thread("objects"))
    shared_pool = in_thread(lambda: open_from_a_raised_thread("text"))   # OCR: shared by every lane
    assert own_pool and shared_pool
    assert all((realtime_of(t), nice_of(t)) == raised_priority(base) for t in own_pool)
    assert all((realtime_of(t), nice_of(t)) == (False, base) for t in shared_pool)
