import numpy as np
import pytest

from tests.perception.perception_helpers import iou, load_image
from service.perception.faces import FULL_RANGE, SHORT_RANGE, FaceDetector, make_anchors, weighted_nms
from service.perception.models import model_path


def test_anchor_layout_matches_the_graphs():
    assert make_anchors(SHORT_RANGE).shape == (896, 2)
    assert make_anchors(FULL_RANGE).shape == (2304, 2)
    a = make_anchors(SHORT_RANGE)
    assert np.allclose(a[0], [0.5 / 16, 0.5 / 16]) and np.allclose(a[1], a[0])   # two anchors per stride-8 cell
    assert np.allclose(a[512], [0.5 / 8, 0.5 / 8])


def test_weighted_nms_blends_overlaps_and_keeps_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    kept = weighted_nms(boxes, np.array([0.9, 0.6, 0.8]), np.zeros((3, 2)))
    assert len(kept) == 2
    assert kept[0][1] == pytest.approx(0.9) and 0 < kept[0][0][0] < 1   # pulled towards the weaker twin


@pytest.mark.parametrize("variant", ["float", "qdq"])
def test_full_range_finds_three_faces_in_each_group_photo_and_none_in_animal_photos(models_dir, variant):
    det = FaceDetector(model_path("face_full", variant, models_dir), "full")
    for name in ("faces1.jpg", "faces2.jpg", "faces3.jpg"):
        faces = det.detect(load_image(name))
        assert len(faces) == 3, (name, [f.score for f in faces])
        for f in faces:
            x1, y1, x2, y2 = f.box
            assert 60 < x2 - x1 < 400 and 60 < y2 - y1 < 400     # face-sized in a 1920-wide photo
            assert len(f.landmarks) == 6
            ex, ey = f.landmarks[0]
            assert x1 <= ex <= x2 and y1 <= ey <= y2              # the eye lies inside its face box
    for name in ("dog.jpg", "horses.jpg"):
        assert det.detect(load_image(name)) == []


def test_qdq_boxes_agree_with_float(models_dir):
    flt = FaceDetector(model_path("face_full", "float", models_dir), "full")
    qdq = FaceDetector(model_path("face_full", "qdq", models_dir), "full")
    img = load_image("faces3.jpg")   # held out from calibration
    for a in flt.detect(img):
        assert max(iou(a.box, b.box) for b in qdq.detect(img)) > 0.9


def test_short_range_runs_and_rejects_bad_input(models_dir):
    det = FaceDetector(model_path("face_short", "float", models_dir), "short")
    assert len(det.detect(load_image("faces1.jpg"))) == 3
    with pytest.raises(ValueError, match="BGR"):
        det.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="anchors"):
        FaceDetector(model_path("face_full", "float", models_dir), "short")
