"""The analysis pipeline's safety lane, on the real cascade: a frame Safety needs is analysed on its own worker
without the slow stages and comes out before a frame that started OCR first; the lane follows the policy per
frame; a failing policy sends frames to the safety lane rather than dropping them."""
from __future__ import annotations

import asyncio

import cv2
import pytest

from service.cameras.ring import CameraFrame
from service.pipeline import AnalysisPipeline
from tests.skills.scenes import photo


class ScriptedHub:
    """The camera hub's consumer side: yields the frames the test puts in."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    async def frames(self):
        while True:
            frame = await self.queue.get()
            if frame is None:
                return
            yield frame


@pytest.fixture(scope="module")
def cascade():
    from service.perception.build import build
    from service.perception.cascade import Cascade, PerceptionConfig
    build(quantize=False, progress=lambda line: None)   # the CPU runs the float graphs
    c = Cascade(PerceptionConfig())
    for name in ("objects", "faces", "text"):
        c.model(name)            # opened up front: the order below is about analysis, not model loading
    return c


def frame(camera_id, role, position, t, image) -> CameraFrame:
    return CameraFrame(camera_id, role, position, t, t, image, image)


def sign_image():
    garage = cv2.resize(photo("dog.jpg"), (640, 480))
    cv2.rectangle(garage, (360, 30), (630, 200), (40, 40, 40), -1)
    for i, line in enumerate(("LEVEL U1", "BAY 230")):
        cv2.putText(garage, line, (375, 95 + 70 * i), cv2.FONT_HERSHEY_DUPLEX, 1.4, (255, 255, 255), 3)
    return garage


async def collect(pipeline, hub, frames, n):
    stream = pipeline.analyses()
    for f in frames:
        hub.queue.put_nowait(f)
    out = []
    async for analysis in stream:
        out.append(analysis)
        if len(out) == n:
            break
    await stream.aclose()
    return out


async def test_a_safety_frame_overtakes_ocr_and_skips_the_slow_stages(cascade):
    hub = ScriptedHub()
    safety_cameras = {"ext-left"}
    pipeline = AnalysisPipeline(hub, cascade,
                                lane_of=lambda f: "safety" if f.camera_id in safety_cameras else "general")
    sign = sign_image()
    side = cv2.resize(photo("dog.jpg"), (640, 480))
    # The front camera's frame (OCR: the slow stage) arrives first, the left camera's a moment later.
    out = await collect(pipeline, hub, [frame("ext-front", "exterior", "front", 10.0, sign),
                                        frame("ext-left", "exterior", "left", 10.01, side)], 2)
    assert [a.camera_id for a in out] == ["ext-left", "ext-front"]
    left, front = out
    assert "objects" in left.stages_run and "text" not in left.stages_run
    assert any(d.label == "bicycle" for d in left.detections)
    assert "text" in front.stages_run and any("U1" in t.text for t in front.texts)


async def test_the_lane_follows_the_policy_and_a_failing_policy_means_safety(cascade):
    hub = ScriptedHub()
    armed = {"on": False}
    pipeline = AnalysisPipeline(hub, cascade, lane_of=lambda f: "safety" if armed["on"] else "general")
    sign = sign_image()
    first, = await collect(pipeline, hub, [frame("ext-right", "exterior", "right", 20.0, sign)], 1)
    assert "text" in first.stages_run                  # general lane: every stage
    armed["on"] = True
    second, = await collect(pipeline, hub, [frame("ext-right", "exterior", "right", 23.0, sign)], 1)
    assert "text" not in second.stages_run and "objects" in second.stages_run   # (3 s apart: the idle refresh)

    def broken(f):
        raise RuntimeError("policy bug")
    pipeline.lane_of = broken
    third, = await collect(pipeline, hub, [frame("ext-right", "exterior", "right", 26.0, sign)], 1)
    assert "objects" in third.stages_run and "text" not in third.stages_run


async def test_the_safety_lane_keeps_a_stage_a_skill_asked_for(cascade):
    """A driver touching the handle arms safe exit on that side (safety lane) while Greeter asks for faces and
    identity there: the lane skips only the slow stages nobody asked for, so the driver is still recognised."""
    from skills.stages import CameraStages
    hub = ScriptedHub()
    stages = CameraStages(cascade)
    pipeline = AnalysisPipeline(hub, cascade)
    pipeline.route(lane_of=lambda f: "safety", requested_stages=stages.requested)
    face = cv2.resize(photo("faces1.jpg"), (640, 480))
    stages.want("ext-handle", "greeter", ("faces", "identity"))
    try:
        seen, = await collect(pipeline, hub, [frame("ext-handle", "exterior", "left", 30.0, face)], 1)
    finally:
        stages.want("ext-handle", "greeter", None)
    assert "identity" in seen.stages_run and "text" not in seen.stages_run
    assert seen.faces and all(f.embedding is not None for f in seen.faces)
