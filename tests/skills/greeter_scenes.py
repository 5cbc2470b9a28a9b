"""Faces for Greeter's tests and bench: the real face pipeline (BlazeFace with landmarks + dlib identity, as the
service runs it), an enrolled driver walking up to a side camera (the photo's person blended in with soft edges,
as a person stands in a scene), and the same face as a flat printed photo held up to the camera."""
from __future__ import annotations

from functools import cache

import cv2
import numpy as np

from service.perception.types import Face
from tests.skills.scenes import background, photo


@cache
def _pipeline():
    from service.perception.faces import FaceDetector
    from service.perception.identity import FaceEmbedder
    from service.perception.liveness import FaceLiveness
    from service.perception.models import model_path
    if not all(model_path(n).is_file() for n in ("face_full", "antispoof", "liveness")):   # a fresh clone
        from service.perception.build import ensure_built
        ensure_built()
    return (FaceDetector(model_path("face_full"), "full"), FaceEmbedder(),
            FaceLiveness(model_path("antispoof"), model_path("liveness")))


def embed_faces(bgr: np.ndarray) -> list[Face]:
    """What the service's `pipeline.embed_faces` returns: detected faces with landmarks and templates."""
    detector, embedder, _ = _pipeline()
    faces = detector.detect(bgr)
    return embedder.embed_faces(bgr, faces) if faces else []


def liveness():
    return _pipeline()[2]


def largest(faces):
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def head_and_shoulders(name: str = "faces1.jpg") -> np.ndarray:
    """The largest face of a photo with its head and shoulders around it."""
    img = photo(name)
    x1, y1, x2, y2 = largest(embed_faces(img)).box
    w, h = x2 - x1, y2 - y1
    return img[max(0, int(y1 - 1.5 * h)):int(y2 + 2.0 * h), max(0, int(x1 - 1.5 * w)):int(x2 + 1.5 * w)].copy()


def live_scene(subject: np.ndarray, height: int, centre=(320, 260), seed: int = 0) -> np.ndarray:
    """A person standing in front of a side camera: the subject blended in with feathered edges."""
    frame = background(640, 480, seed=seed).astype(np.float32)
    scale = height / subject.shape[0]
    patch = cv2.resize(subject, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA).astype(np.float32)
    ph, pw = patch.shape[:2]
    mask = np.zeros((ph, pw), np.float32)
    cv2.ellipse(mask, (pw // 2, ph // 2), (int(pw * 0.42), int(ph * 0.44)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(2.0, 0.06 * pw))[..., None]
    x0, y0 = int(centre[0] - pw / 2), int(centre[1] - ph / 2)
    region = frame[max(0, y0):y0 + ph, max(0, x0):x0 + pw]
    sub_patch = patch[max(0, -y0):max(0, -y0) + region.shape[0], max(0, -x0):max(0, -x0) + region.shape[1]]
    sub_mask = mask[max(0, -y0):max(0, -y0) + region.shape[0], max(0, -x0):max(0, -x0) + region.shape[1]]
    region[:] = region * (1 - sub_mask) + sub_patch * sub_mask
    return np.clip(frame, 0, 255).astype(np.uint8)


def printed_photo_scene(subject: np.ndarray, height: int, centre=(320, 250), tilt_deg: float = 6.0,
                        seed: int = 0) -> np.ndarray:
    """The subject printed on paper (white border, the print's lower contrast) and held up, slightly turned."""
    printed = np.clip(subject.astype(np.float32) * 0.8 + 25, 0, 255).astype(np.uint8)
    border = int(0.08 * max(printed.shape[:2]))
    card = cv2.copyMakeBorder(printed, border, border, border, border, cv2.BORDER_CONSTANT, value=(235, 235, 232))
    frame = background(640, 480, seed=seed)
    ch, cw = card.shape[:2]
    s = height / ch
    w, h = cw * s, ch * s
    t = np.deg2rad(tilt_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]]) @ rot.T
    corners[1] += [0, -0.06 * h]     # held at a slight angle: perspective
    corners[2] += [0, 0.06 * h]
    dst = np.float32(corners + centre)
    m = cv2.getPerspectiveTransform(np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]]), dst)
    warped = cv2.warpPerspective(card, m, (640, 480))
    inside = cv2.warpPerspective(np.full((ch, cw), 255, np.uint8), m, (640, 480)) > 0
    frame[inside] = warped[inside]
    return frame
