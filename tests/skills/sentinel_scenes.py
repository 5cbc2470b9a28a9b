"""Exterior scenes for Sentinel's tests and bench: the person crop of person.jpg composited where a camera with
the configured geometry would see a person standing `distance_m` away, so box size and feet agree with the
distance (as they do on a real camera), plus walks (approach, pass-by) and a pose with a wrist at a point."""
from __future__ import annotations

import math

from service.perception.types import Detection, FrameAnalysis, Motion, Pose
from skills.config import CameraGeometry
from tests.skills.scenes import PERSON_CROP, analysis, background, crop, paste

WIDTH, HEIGHT = 640, 480
SIDE = CameraGeometry(1.0, 0.0, 60.0)     # the default left/right camera geometry
PERSON_HEIGHT_M = 1.7


def focal(geometry: CameraGeometry = SIDE, height: int = HEIGHT) -> float:
    return (height / 2) / math.tan(math.radians(geometry.vfov_deg) / 2)


def person_box_at(distance_m: float, lateral_m: float = 0.0, geometry: CameraGeometry = SIDE):
    """The box (pixels, unclipped) of a 1.7 m person standing `distance_m` from the camera, `lateral_m` aside."""
    f = focal(geometry)
    feet = HEIGHT / 2 + f * math.tan(math.atan(geometry.height_m / distance_m) - math.radians(geometry.pitch_deg))
    h = f * PERSON_HEIGHT_M / distance_m
    w = h * (PERSON_CROP[2] - PERSON_CROP[0]) / (PERSON_CROP[3] - PERSON_CROP[1])
    cx = WIDTH / 2 + f * lateral_m / distance_m
    return cx - w / 2, feet - h, cx + w / 2, feet


def scene(people, seed: int = 0, track_ids=None):
    """A frame with people at (distance_m, lateral_m); returns (frame, detections)."""
    frame = background(WIDTH, HEIGHT, seed=seed)
    detections = []
    for i, (d, lat) in enumerate(sorted(people, key=lambda p: -p[0])):   # far ones first: near ones occlude
        box = person_box_at(d, lat)
        if box[2] - 2 <= 0 or box[0] + 2 >= WIDTH:   # out of this camera's view
            continue
        covered = paste(frame, crop("person.jpg", PERSON_CROP), box)
        detections.append(Detection("person", 0.9, covered, track_id=None if track_ids is None else track_ids[i]))
    return frame, detections


def wrist_pose(box, wrist_xy, score: float = 0.8) -> Pose:
    """A pose for the person in `box` with the right wrist at `wrist_xy` (other keypoints at the box centre)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    keypoints = [(cx, cy, 0.8)] * 17
    keypoints[10] = (wrist_xy[0], wrist_xy[1], score)
    return Pose(keypoints=tuple(keypoints), score=0.8, box=box)


def frame_analysis(camera_id: str, position: str, t: float, frame, detections=(), poses=(),
                   motion: Motion | None = None, stages=("motion", "objects")) -> FrameAnalysis:
    from dataclasses import replace
    return replace(analysis(camera_id, "exterior", position, t, frame, detections, motion=motion, stages=stages),
                   poses=tuple(poses))
