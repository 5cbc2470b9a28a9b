"""The real-time safety lane keeps its busy share at SAFETY_LANE_DUTY_CAP: it pauses before its next frame just
long enough for the share over the last window to fall back to the cap (deterministic clock, no timing)."""
from __future__ import annotations

import asyncio

import pytest

from service.pipeline import SAFETY_LANE_DUTY_CAP, AnalysisPipeline, DutyCycle
from tests.skills.scenes import photo
from tests.skills.test_safety_lane import ScriptedHub, frame


def test_under_the_cap_there_is_no_pause():
    duty = DutyCycle(cap=0.5, window=1.0)
    assert duty.pause(10.0) == 0.0
    duty.record(9.0, 9.3)
    duty.record(9.85, 9.95)                 # 0.4 s busy in the last second
    assert duty.pause(10.0) == 0.0


def test_over_the_cap_the_pause_brings_the_share_back_to_it():
    duty = DutyCycle(cap=0.5, window=1.0)
    duty.record(9.0, 9.3)
    duty.record(9.4, 9.7)
    assert duty.pause(10.0) == pytest.approx(0.1)     # 0.6 s busy: wait until 9.0-9.1 leaves the window
    duty.record(9.7, 10.0)
    rest = duty.pause(10.0)
    assert rest == pytest.approx(0.5)                 # 0.9 s busy: the window must start at 9.5
    later = 10.0 + rest
    busy_after_pause = sum(min(e, later) - max(s, later - 1.0) for s, e in ((9.0, 9.3), (9.4, 9.7), (9.7, 10.0))
                           if e > later - 1.0)
    assert busy_after_pause == pytest.approx(0.5) and duty.pause(later) == pytest.approx(0.0)


def test_old_work_leaves_the_window_and_a_busy_lane_never_waits_a_whole_window():
    duty = DutyCycle(cap=0.5, window=1.0)
    duty.record(0.0, 5.0)                             # one run longer than the window
    assert duty.pause(5.0) == pytest.approx(0.5)
    assert duty.pause(7.0) == 0.0 and not duty._spans


def test_bad_caps_are_refused():
    for cap, window in ((0.0, 1.0), (1.5, 1.0), (0.5, 0.0)):
        with pytest.raises(ValueError, match="duty cycle"):
            DutyCycle(cap, window)


async def test_the_pipeline_counts_the_safety_lanes_analyses_only():
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    build(quantize=False, progress=lambda line: None)
    hub = ScriptedHub()
    pipeline = AnalysisPipeline(hub, Cascade(PerceptionConfig()),
                                lane_of=lambda f: "safety" if f.camera_id == "ext-left" else "general")
    assert pipeline.safety_duty.cap == SAFETY_LANE_DUTY_CAP < 1
    stream = pipeline.analyses()
    hub.queue.put_nowait(frame("ext-front", "exterior", "front", 10.0, photo("dog.jpg")))
    hub.queue.put_nowait(frame("ext-left", "exterior", "left", 10.0, photo("dog.jpg")))
    got = [await asyncio.wait_for(stream.__anext__(), 60) for _ in range(2)]
    await stream.aclose()
    assert {a.camera_id for a in got} == {"ext-front", "ext-left"}
    assert len(pipeline.safety_duty._spans) == 1      # the left camera's frame; the general lane is not capped
