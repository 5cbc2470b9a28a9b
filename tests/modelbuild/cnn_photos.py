"""Photo inputs and the held-out features SQNR shared by the tiny-CNN recipe tests (test_cnn_qat,
test_cnn_sequential): augmented crops of the calibration photos, plain crops of the held-out photos."""
from __future__ import annotations

import numpy as np

from service.modelbuild import qdq
from service.modelbuild.efficientnet_lite import crops
from service.perception.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, load_photo
from service.runtime.backends import create_session


def calibration_and_held(size: int, per_photo: int = 24, held_per_photo: int = 8) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    calibration = [{"pixel_values": x} for p in CALIBRATION_PHOTOS
                   for x in crops(load_photo(p), per_photo, rng, size, True)]
    held = [{"pixel_values": x} for p in HELD_OUT_PHOTOS for x in crops(load_photo(p), held_per_photo, rng, size)]
    return calibration, held


def features_sqnr(float_path, quant_path, held) -> float:
    """The quantized graph's `features` against the float graph's, over all held-out inputs together (CPU EP)."""
    ref, got = create_session(float_path, "cpu"), create_session(quant_path, "cpu")
    return qdq.sqnr_db(np.concatenate([ref.run(["features"], f)[0] for f in held]),
                       np.concatenate([got.run(["features"], f)[0] for f in held]))
