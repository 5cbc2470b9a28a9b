
import numpy as np
import pytest

from tests.perception.perception_helpers import iou, load_image
from service.perception.models import model_path
from service.perception.objects import COCO_CLASSES, REG_MAX, IouTracker, ObjectDetector, decode
from service.perception.types import Detection


@pytest.mark.parametrize("variant", ["float", "qdq"])
def test_coco_acceptance_photos(models_dir, variant):
    det = ObjectDetector(model_path("objects", variant, models_dir))
    dog = {d.label for d in det.detect(load_image("dog.jpg"))}
    assert {"dog", "bicycle"} <= dog and dog & {"car", "truck"}, dog
    person = {d.label for d in det.detect(load_image("person.jpg"))}
    assert {"person", "horse", "dog"} <= person, person


def test_boxes_sit_on_the_objects(models_dir):
    det = ObjectDetector(model_path("objects", "float", models_dir))
    found = {d.label: d.box for d in det.detect(load_image("person.jpg"))}
    # Boxes checked by eye on the photo (x1, y1, x2, y2): the walker and the grazing horse.
    assert iou(found["person"], (190, 98, 274, 380)) > 0.7
    assert iou(found["horse"], (396, 137, 612, 346)) > 0.7


def test_gfl_decoding_of_a_synthetic_head():
    scores = [np.zeros((52 * 52, 80), np.float32), np.zeros((26 * 26, 80), np.float32),
              np.zeros((13 * 13, 80), np.float32)]
    boxes = [np.zeros((len(s), 4 * (REG_MAX + 1)), np.float32) for s in scores]
    cell = 3 * 26 + 5                      # stride 16, row 3, column 5: centre (88, 56)
    scores[1][cell, COCO_CLASSES.index("car")] = 0.9
    logits = np.full((4, REG_MAX + 1), -50.0, np.float32)
    logits[[0, 1, 2, 3], [2, 1, 3, 4]] = 50.0   # distances 2, 1, 3, 4 bins -> 32, 16, 48, 64 px
    boxes[1][cell] = logits.reshape(-1)
    b, s, c = decode(scores, boxes, 0.5)
    assert c.tolist() == [COCO_CLASSES.index("car")] and s[0] == pytest.approx(0.9)
    assert b[0] == pytest.approx([88 - 32, 56 - 16, 88 + 48, 56 + 64])


def test_tracker_ids_velocity_and_looming():
    tracker = IouTracker(smoothing=0.0)
    first = tracker.update([Detection("car", 0.9, (100, 100, 200, 200)),
                            Detection("person", 0.8, (400, 100, 450, 250))], 0.0)
    ids = {d.label: d.track_id for d in first}
    # The car moves right 10 px and grows 10% per side over 0.5 s; the person stays.
    second = tracker.update([Detection("person", 0.8, (400, 100, 450, 250)),
                             Detection("car", 0.9, (105, 95, 215, 205))], 0.5)
    car = next(d for d in second if d.label == "car")
    assert {d.label: d.track_id for d in second} == ids
    assert car.velocity == pytest.approx((20.0, 0.0))
    assert car.looming == pytest.approx((110 * 110 / 100 / 100 - 1) / 0.5)
    assert next(d for d in second if d.label == "person").looming == 0.0
    # A car far away is a new track, and lost tracks expire.
    third = tracker.update([Detection("car", 0.9, (600, 300, 650, 350))], 1.0)
    assert third[0].track_id not in ids.values()
    for t in range(2, 9):
        tracker.update([], float(t))
    assert tracker.update([Detection("person", 0.8, (400, 100, 450, 250))], 9.0)[0].track_id not in ids.values()
