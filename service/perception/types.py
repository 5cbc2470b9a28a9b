"""What perception hands downstream (to skills). Data flows one way: skills import these, never the reverse."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the analysed frame


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when they do not overlap."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0



@dataclass(frozen=True)
class Detection:
    label: str                 # COCO class name: "person", "bicycle", "car", ...
    score: float
    box: Box
    track_id: int | None = None
    velocity: tuple[float, float] = (0.0, 0.0)  # box-centre pixels per second
    looming: float = 0.0       # relative box-area growth per second; > 0 means approaching


@dataclass(frozen=True)
class Face:
    box: Box
    score: float
    landmarks: tuple[tuple[float, float], ...] = ()
    embedding: np.ndarray | None = None   # identity template, when the identity stage ran
    age: float | None = None              # estimated years, when the age stage ran (service.perception.age)


@dataclass(frozen=True)
class TextLine:
    text: str
    score: float
    box: Box


@dataclass(frozen=True)
class Pose:
    """One body from the pose stage (MoveNet multi-pose, service.perception.pose): 17 COCO keypoints."""
    keypoints: tuple[tuple[float, float, float], ...]   # (x, y, score) in pixels, COCO order (nose first)
    score: float
    box: Box


@dataclass(frozen=True)
class Motion:
    fraction: float                                  # share of the frame's pixels that moved
    regions: tuple[Box, ...] = ()
    zones: dict[str, float] = field(default_factory=dict)  # moved fraction per configured zone


@dataclass(frozen=True)
class FrameAnalysis:
    camera_id: str
    role: str                  # "cabin" | "exterior"
    position: str              # "front", "rear", "left", "right", "cabin_front", "cabin_rear"
    timestamp: float           # capture time, seconds since the epoch
    frame: np.ndarray          # the analysed BGR frame
    motion: Motion | None = None
    detections: tuple[Detection, ...] = ()
    faces: tuple[Face, ...] = ()
    texts: tuple[TextLine, ...] = ()
    poses: tuple[Pose, ...] = ()
    stages_run: tuple[str, ...] = ()   # which cascade stages ran on this frame (the governor may skip some)
