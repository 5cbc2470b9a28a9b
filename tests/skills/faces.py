"""dlib face identity for the tests: the same 128-d ResNet embeddings the perception stage produces, from the
`face_recognition_models` package (weights installed with the environment, nothing downloaded)."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np

from service.perception.types import Face


@cache
def _models():
    import importlib.util

    import dlib
    # Importing the package needs pkg_resources (not installed); its model files sit next to its __init__.
    spec = importlib.util.find_spec("face_recognition_models")
    base = Path(spec.origin).parent / "models"
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(base / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(base / "dlib_face_recognition_resnet_model_v1.dat")))


def dlib_face_embedder(bgr: np.ndarray) -> list[Face]:
    detector, shapes, encoder = _models()
    rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    out = []
    for rect in detector(rgb, 1):
        embedding = np.asarray(encoder.compute_face_descriptor(rgb, shapes(rgb, rect)), dtype=np.float32)
        box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
        out.append(Face(box=box, score=1.0, embedding=embedding))
    return out
