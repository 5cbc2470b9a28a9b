"""Scripted scenes for the skills' scenario tests: real photo crops composited onto plain backgrounds.

Boxes of the pasted crops are known, so until a detector runs the tests hand skills `FrameAnalysis` objects with
those boxes (legitimate for state machines); an approach is a crop pasted at a growing size.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np

from service.cameras.ring import CameraFrame, FrameRing
from service.perception.types import Detection, FrameAnalysis, Motion

DATA = Path(__file__).resolve().parents[2] / "deploy" / "sim" / "images"   # the repository's photo set

# Regions of the photos (x1, y1, x2, y2) holding the subject, measured on the originals.
PERSON_CROP = (170, 80, 290, 390)       # person.jpg: the standing person
BICYCLE_CROP = (110, 110, 580, 450)     # dog.jpg: the bicycle


@cache
def photo(name: str) -> np.ndarray:
    image = cv2.imread(str(DATA / name))
    if image is None:
        raise FileNotFoundError(DATA / name)
    image.setflags(write=False)
    return image


def crop(name: str, box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return photo(name)[y1:y2, x1:x2]


def background(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A car-park-ish backdrop: grey gradient (tarmac, wall) with mild sensor noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(70, 150, height, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(ramp, (height, width, 3)).copy()
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, patch: np.ndarray, box) -> tuple[float, float, float, float]:
    """Paste `patch` resized into `box` (clipped to the canvas); returns the box actually covered."""
    h, w = canvas.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    canvas[y1:y2, x1:x2] = cv2.resize(patch, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    return float(x1), float(y1), float(x2), float(y2)


def person_frame(box, *, seed: int = 0):
    """An exterior frame with the person pasted at `box`; returns (frame, detection)."""
    frame = background(seed=seed)
    covered = paste(frame, crop("person.jpg", PERSON_CROP), box)
    return frame, Detection("person", 0.9, covered)


def person_box(height_fraction: float, centre_x: float = 320, frame_h: int = 480):
    """A standing person whose box is `height_fraction` of the frame tall, feet near the bottom."""
    ph, pw = PERSON_CROP[3] - PERSON_CROP[1], PERSON_CROP[2] - PERSON_CROP[0]
    h = height_fraction * frame_h
    w = h * pw / ph
    bottom = frame_h - 10
    return (centre_x - w / 2, bottom - h, centre_x + w / 2, bottom)


def approach_boxes(n: int, start_height: float, end_height: float, centre_x: float = 320, frame_h: int = 480):
    """An object approaching: the same crop at a growing size, bottom-anchored."""
    return [person_box(start_height + (end_height - start_height) * i / max(n - 1, 1), centre_x, frame_h)
            for i in range(n)]


def analysis(camera_id: str, role: str, position: str, t: float, frame: np.ndarray, detections=(), faces=(),
             texts=(), motion: Motion | None = None, stages=("motion", "detect")) -> FrameAnalysis:
    return FrameAnalysis(camera_id=camera_id, role=role, position=position, timestamp=t, frame=frame,
                         motion=motion, detections=tuple(detections), faces=tuple(faces), texts=tuple(texts),
                         stages_run=tuple(stages))


class RingFrames:
    """The camera hub's reader side (latest/history) over the hub's own `FrameRing`, fed by the test script."""

    def __init__(self, seconds: float = 10.0):
        self.seconds = seconds
        self.rings: dict[str, FrameRing] = {}

    def add(self, a: FrameAnalysis, sequence: int = 0) -> None:
        ring = self.rings.setdefault(a.camera_id, FrameRing(self.seconds, 256 * 1024 * 1024))
        ring.append(CameraFrame(a.camera_id, a.role, a.position, a.timestamp, a.timestamp, a.frame, a.frame,
                                sequence))

    def latest(self, camera_id: str):
        ring = self.rings.get(camera_id)
        return ring.latest() if ring else None

    def camera_ids(self) -> list[str]:
        return sorted(self.rings)

    def history(self, camera_id: str, seconds: float):
        ring = self.rings.get(camera_id)
        newest = ring.latest() if ring else None
        return [] if newest is None else ring.since(newest.capture_time - seconds)
