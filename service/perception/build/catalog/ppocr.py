"""PP-OCR text detection (square and strip inputs) and recognition, from the `rapidocr` package (ONNX)."""
from __future__ import annotations

import numpy as np

from service.perception.build.spec import ModelSpec
from service.perception.text import DET_SIZE, DET_STRIP, REC_HEIGHT, REC_WIDTH


def _det_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, CALIBRATION_SIGNS, load_photo, sign_images
    from service.perception.text import det_preprocess
    imgs = [img for img, _ in sign_images(CALIBRATION_SIGNS, CALIBRATION_PHOTOS)]
    imgs += [load_photo(n) for n in CALIBRATION_PHOTOS]
    return [det_preprocess(img)[0] for img in imgs]


def _strip_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, CALIBRATION_SIGNS, sign_strips
    from service.perception.text import det_preprocess
    return [det_preprocess(strip, DET_STRIP)[0] for strip in sign_strips(CALIBRATION_SIGNS, CALIBRATION_PHOTOS)]


def _rec_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, CALIBRATION_SIGNS, sign_crops
    from service.perception.text import rec_preprocess
    return [rec_preprocess(c) for c in sign_crops(CALIBRATION_SIGNS, CALIBRATION_PHOTOS)]


_DET = "models/PP-OCRv6_det_small.onnx"
SPECS = (
    ModelSpec("ocr_det", "rapidocr", _DET, "onnx", (1, 3, DET_SIZE, DET_SIZE), _det_inputs),
    ModelSpec("ocr_det_strip", "rapidocr", _DET, "onnx", (1, 3, *DET_STRIP), _strip_inputs),
    ModelSpec("ocr_rec", "rapidocr", "models/PP-OCRv6_rec_small.onnx", "onnx", (1, 3, REC_HEIGHT, REC_WIDTH),
              _rec_inputs),
)
