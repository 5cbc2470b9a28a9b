import itertools

import cv2
import numpy as np
import pytest

from tests.perception.perception_helpers import iou, load_image
from service.perception.faces import FaceDetector
from service.perception.identity import (DEFAULT_THRESHOLD, FaceEmbedder, Gallery, IdentityConfig,
                                         check_enrollable, distance, yaw_proxy)
from service.perception.models import model_path

PHOTOS = ("faces1.jpg", "faces2.jpg", "faces3.jpg")


def relit_mirror(img):
    """A horizontally flipped copy, 40% darker with a slight lift: a different pass by the cabin camera."""
    return np.clip(cv2.flip(img, 1).astype(np.float32) * 0.6 + 10, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def faces(models_dir):
    det = FaceDetector(model_path("face_full", "float", models_dir), "full")
    emb = FaceEmbedder()
    out = []
    for name in PHOTOS:
        img = load_image(name)
        for f in emb.embed_faces(img, det.detect(img)):
            out.append((name, img, f))
    return det, emb, out


def test_nine_faces_each_match_only_their_own_mirrored_relit_copy(faces):
    det, emb, all_faces = faces
    assert len(all_faces) == 9
    frontal = [(n, img, f) for n, img, f in all_faces if yaw_proxy(f) <= 0.35]
    assert len(frontal) >= 8
    for i, (name, img, face) in enumerate(frontal):
        check_enrollable(face)
        gallery = Gallery()
        gallery.enroll("owner", face.embedding)
        mirror = relit_mirror(img)
        w = img.shape[1]
        x1, y1, x2, y2 = face.box
        twin = max(det.detect(mirror), key=lambda f: iou(f.box, (w - x2, y1, w - x1, y2)))
        assert iou(twin.box, (w - x2, y1, w - x1, y2)) > 0.5
        who, d = gallery.match(emb.embed(mirror, twin.box))
        assert who == "owner", (name, i, d)
        for j, (_, _, other) in enumerate(all_faces):
            if other is not face:
                assert gallery.match(other.embedding)[0] is None, (name, i, j)


def test_threshold_separates_genuine_and_impostor_distances(faces):
    _, _, all_faces = faces
    impostor = min(distance(a[2].embedding, b[2].embedding) for a, b in itertools.combinations(all_faces, 2))
    assert impostor > DEFAULT_THRESHOLD   # the calibration in identity.py still holds for these photos


def test_profile_face_is_refused_for_enrolment_and_bad_input_is_rejected(faces):
    _, emb, all_faces = faces
    turned = max((f for _, _, f in all_faces), key=yaw_proxy)
    with pytest.raises(ValueError, match="turned too far"):
        check_enrollable(turned)
    with pytest.raises(ValueError, match="128-d"):
        Gallery().enroll("x", np.zeros(64))
    with pytest.raises(ValueError, match="too small"):
        emb.embed(load_image("faces1.jpg"), (0, 0, 3, 3))
    with pytest.raises(ValueError, match="threshold"):
        IdentityConfig(threshold=0).validate()
