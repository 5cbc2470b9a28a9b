from dataclasses import dataclass

import cv2
import numpy as np
import pytest

from tests.perception.perception_helpers import load_image
from service.perception.calibration import draw_sign
from service.perception.cascade import CameraCascadeConfig, Cascade, PerceptionConfig
from service.perception.identity import Gallery


@dataclass
class Meta:
    camera_id: str
    role: str
    position: str
    capture_time: float


@pytest.fixture(scope="module")
def cascade(models_dir):
    return Cascade(PerceptionConfig(models_dir=str(models_dir), cameras={
        "cabin": CameraCascadeConfig(idle_refresh_seconds=5.0)}))


def test_cabin_camera_runs_motion_faces_identity_and_motion_gates_repeats(cascade):
    img = cv2.resize(load_image("faces1.jpg"), (768, 512))
    first = cascade.analyze(img, Meta("cabin", "cabin", "cabin_front", 100.0))
    assert first.stages_run == ("motion", "faces", "age", "identity", "objects", "pose")
    assert sum(d.label == "person" for d in first.detections) >= 2 and len(first.poses) == 3
    assert all(f.age is not None and f.age >= 18 for f in first.faces)   # three adults
    assert len(first.faces) == 3 and all(f.embedding is not None and f.embedding.shape == (128,) for f in first.faces)
    assert first.camera_id == "cabin" and first.timestamp == 100.0 and first.frame is img
    for i in range(5):   # MOG2 needs a few frames before its variance settles
        still = cascade.analyze(img, Meta("cabin", "cabin", "cabin_front", 100.0 + 0.1 * (i + 1)))
    assert still.stages_run == ("motion",) and still.faces == ()        # nothing moved: detectors gated
    moved = img.copy()
    cv2.rectangle(moved, (560, 380), (767, 511), (0, 0, 255), -1)   # away from the faces
    woke = cascade.analyze(moved, Meta("cabin", "cabin", "cabin_front", 100.6))
    assert "faces" in woke.stages_run and woke.motion.fraction > 0.05
    refresh = cascade.analyze(moved, Meta("cabin", "cabin", "cabin_front", 106.0))
    assert "faces" in refresh.stages_run                                 # idle refresh after 5 s
    gallery = Gallery()
    gallery.enroll("driver", first.faces[0].embedding)
    assert sum(gallery.match(f.embedding)[0] == "driver" for f in refresh.faces) == 1
    cv2.rectangle(moved, (560, 300), (767, 379), (255, 0, 0), -1)   # more movement, same people
    soon = cascade.analyze(moved, Meta("cabin", "cabin", "cabin_front", 106.1))
    # same three faces 0.1 s later: identity not re-run yet
    assert soon.stages_run == ("motion", "faces", "age", "objects", "pose")


def test_exterior_camera_reads_a_sign_and_the_governor_lowers_depth(cascade):
    sign, _ = draw_sign(load_image("dog.jpg"), "P2 LEVEL C-14", (40, 20), 1.6)
    out = cascade.analyze(sign, Meta("front", "exterior", "front", 1.0))
    assert out.stages_run == ("motion", "objects", "text") and [t.text for t in out.texts] == ["P2 LEVEL C-14"]
    assert {"dog", "bicycle"} <= {d.label for d in out.detections}
    assert all(d.track_id is not None for d in out.detections)
    cascade.set_depth(1)
    try:
        low = cascade.analyze(sign, Meta("front", "exterior", "front", 10.0))
        assert low.stages_run == ("motion",) and low.texts == ()
    finally:
        cascade.set_depth(5)
    cascade.set_stages("front", ("text",))      # no motion gate: every frame is read
    assert cascade.analyze(sign, Meta("front", "exterior", "front", 10.1)).stages_run == ("text",)
    cascade.set_stages("front", None)


def test_bad_settings_and_frames_are_rejected(cascade):
    with pytest.raises(ValueError, match="stages"):
        cascade.set_stages("x", ("lidar",))
    with pytest.raises(ValueError, match="identity"):
        cascade.set_stages("x", ("identity",))
    with pytest.raises(ValueError, match="depth"):
        cascade.set_depth(9)
    with pytest.raises(ValueError, match="cameras.rear.motion_threshold"):
        PerceptionConfig(cameras={"rear": CameraCascadeConfig(motion_threshold=2)}).validate()
    with pytest.raises(ValueError, match="BGR"):
        cascade.analyze(np.zeros((4, 4), np.float32), Meta("a", "cabin", "cabin_front", 0))
