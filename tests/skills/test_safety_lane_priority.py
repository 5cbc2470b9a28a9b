"""The safety lane preempts slower work on a CPU host: its worker runs SAFETY_BOOST nice steps above the process
where the OS permits (else at the process's priority), the general lane at the process's own, and the safety
lane analyses on its own detector sessions; threads a raised thread starts (ONNX Runtime's pools) inherit it."""
from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from service.thread_priority import SAFETY_BOOST, nice_of, raise_current_thread
from tests.skills.scenes import photo
from tests.skills.test_safety_lane import ScriptedHub, frame

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def in_thread(fn):
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def raising_permitted() -> bool:
    return in_thread(raise_current_thread)


def expected_safety_nice(base: int) -> int:
    return max(-20, base - SAFETY_BOOST) if raising_permitted() else base


def test_a_raised_thread_and_the_threads_it_starts_run_above_the_process():
    base = nice_of()

    def raise_then_start_one():
        raised = raise_current_thread()
        return raised, nice_of(), in_thread(nice_of)

    raised, own, child = in_thread(raise_then_start_one)
    assert own == child == (max(-20, base - SAFETY_BOOST) if raised else base)
    assert nice_of() == base                      # the caller itself is untouched


class NiceRecordingCascade:
    """The real cascade; notes each lane's thread nice value and the object detector it was handed."""

    def __init__(self, cascade):
        self.cascade, self.seen = cascade, {}

    def __getattr__(self, name):
        return getattr(self.cascade, name)

    def analyze(self, bgr, meta, skip=(), job=None, models=None):
        self.seen[meta.camera_id] = (nice_of(), (models or self.cascade.model)("objects"))
        return self.cascade.analyze(bgr, meta, skip, job, models)


async def test_the_safety_lane_runs_raised_on_its_own_sessions_and_the_general_lane_unchanged():
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    from service.pipeline import AnalysisPipeline
    build(quantize=False, progress=lambda line: None)
    cascade = NiceRecordingCascade(Cascade(PerceptionConfig()))
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
    general_nice, general_detector = cascade.seen["ext-front"]
    safety_nice, safety_detector = cascade.seen["ext-left"]
    assert general_nice == base
    assert safety_nice == expected_safety_nice(base)
    assert general_detector is cascade.cascade.model("objects")
    assert safety_detector is not general_detector     # its own session, opened on the safety lane's thread
    left = next(a for a in got if a.camera_id == "ext-left")
    assert any(d.label == "bicycle" for d in left.detections)
