"""Child presence's age decision on stated face ages (the repository has no photo of a child, so the age model's
child side is not checked on a real face; tests/skills/test_safety.py checks the real adults): the youngest
face in a seat zone decides, between the two thresholds the occupant is "uncertain", and a zone without a
face age is "unknown"."""
from __future__ import annotations

import numpy as np
import pytest

from service.perception.types import Detection, Face, FrameAnalysis
from skills.safety_config import SafetyConfig
from skills.safety_presence import PresenceTracker


def cabin_frame(t: float, ages: list[float]) -> FrameAnalysis:
    """Faces side by side in a 640x480 cabin_front frame, one per age."""
    faces = tuple(Face(box=(40.0 + 150 * i, 120.0, 140.0 + 150 * i, 240.0), score=0.9, age=age)
                  for i, age in enumerate(ages))
    return FrameAnalysis("cabin", "cabin", "cabin_front", t, np.zeros((480, 640, 3), np.uint8),
                         faces=faces, stages_run=("motion", "faces", "age"))


@pytest.mark.parametrize(("ages", "expected"), [([6.0], "child"), ([35.0], "adult"), ([15.0], "uncertain"),
                                                ([], "unknown")])
def test_the_age_estimate_decides_child_adult_or_not_sure(ages, expected):
    cfg = SafetyConfig()
    tracker = PresenceTracker(cfg)
    for i in range(cfg.child_confirm_frames):
        frame = cabin_frame(100.0 + i, ages)
        if not ages:   # a body seen without a face: presence without an age
            frame = FrameAnalysis("cabin", "cabin", "cabin_front", 100.0 + i, frame.frame,
                                  detections=(Detection("person", 0.8, (60.0, 100.0, 200.0, 400.0)),),
                                  stages_run=("motion", "objects"))
        tracker.add(frame)
    people = [o for o in tracker.confirmed() if o.kind == "person"]
    assert people and {o.estimate for o in people} == {expected}


def test_the_youngest_face_in_a_zone_decides():
    cfg = SafetyConfig()
    tracker = PresenceTracker(cfg)
    for i in range(cfg.child_confirm_frames):   # an adult leaning over a child in one seat zone
        frame = cabin_frame(100.0 + i, [])
        faces = (Face(box=(100.0, 120.0, 180.0, 200.0), score=0.9, age=38.0),
                 Face(box=(110.0, 210.0, 170.0, 270.0), score=0.9, age=5.0))
        tracker.add(FrameAnalysis("cabin", "cabin", "cabin_front", 100.0 + i, frame.frame, faces=faces,
                                  stages_run=("motion", "faces", "age")))
    estimates = {(o.zone, o.estimate) for o in tracker.confirmed() if o.kind == "person"}
    assert estimates and all(e == "child" for _, e in estimates)
