import cv2
import numpy as np
import pytest

from service.perception.motion import MotionConfig, MotionDetector
from tests.perception.perception_helpers import load_image


def test_static_scene_has_no_motion_and_a_moving_block_is_found_in_its_zone():
    img = load_image("dog.jpg")
    det = MotionDetector(MotionConfig(zones={"left": ((0, 0), (0.5, 0), (0.5, 1), (0, 1)),
                                             "right": ((0.5, 0), (1, 0), (1, 1), (0.5, 1))}))
    for _ in range(10):
        still = det.update(img)
    assert still.fraction == 0.0 and still.regions == ()
    moved = img.copy()
    cv2.rectangle(moved, (50, 100), (200, 300), (0, 255, 0), -1)
    m = det.update(moved)
    assert m.fraction > 0.03
    assert m.zones["left"] > 0.1 and m.zones["right"] == 0.0
    x1, y1, x2, y2 = m.regions[0]
    assert abs(x1 - 50) < 8 and abs(y1 - 100) < 8 and abs(x2 - 200) < 8 and abs(y2 - 300) < 8


def test_ignored_area_does_not_count():
    img = load_image("person.jpg")
    det = MotionDetector(MotionConfig(ignore=(((0, 0), (0.5, 0), (0.5, 1), (0, 1)),)))
    for _ in range(5):
        det.update(img)
    moved = img.copy()
    w = img.shape[1]
    cv2.rectangle(moved, (10, 10), (w // 2 - 20, 200), (255, 255, 255), -1)
    assert det.update(moved).fraction == 0.0


def test_bad_config_and_bad_input_are_rejected():
    with pytest.raises(ValueError, match="zones.a"):
        MotionConfig(zones={"a": ((0, 0), (1, 1))}).validate()
    with pytest.raises(ValueError, match="analysis_width"):
        MotionDetector(MotionConfig(analysis_width=4))
    with pytest.raises(ValueError, match="BGR"):
        MotionDetector().update(np.zeros((10, 10), np.uint8))
