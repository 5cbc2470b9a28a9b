"""Camera ingest metrics, per camera; a forgotten camera's series are removed with it (garbage ids do not grow
the registry)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from incar.v1 import cameras_pb2

FRAMES_ACCEPTED = Counter("incar_camera_frames_accepted_total", "Frames decoded and stored", ["camera"])
FRAMES_DROPPED = Counter("incar_camera_frames_dropped_total", "Valid frames not processed, by reason",
                         ["camera", "reason"])
FRAMES_INVALID = Counter("incar_camera_frames_invalid_total", "Frames refused as bad input, by offending field",
                         ["field"])
FRAME_AGE = Histogram("incar_camera_frame_age_seconds", "Capture to stored-and-decoded time", ["camera"],
                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0))
DECODE_SECONDS = Histogram("incar_camera_decode_seconds", "Decode plus resize time per frame", ["camera"],
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5))
CAMERA_UP = Gauge("incar_camera_up", "1 while the camera delivers frames (watchdog)", ["camera"])
CAMERA_FPS = Gauge("incar_camera_frames_per_second", "Accepted frames per second, recent window", ["camera"])
QUEUE_DEPTH = Gauge("incar_camera_queue_depth", "Frames waiting for decode", ["camera"])
RING_BYTES = Gauge("incar_camera_ring_bytes", "Bytes held in the camera's ring buffer", ["camera"])

REASON_LABELS = {cameras_pb2.DROP_REASON_OVERLOAD: "overload", cameras_pb2.DROP_REASON_STALE: "stale",
                 cameras_pb2.DROP_REASON_OUT_OF_ORDER: "out_of_order",
                 cameras_pb2.DROP_REASON_RATE_LIMITED: "rate_limited"}

PER_CAMERA = (FRAMES_ACCEPTED, FRAME_AGE, DECODE_SECONDS, CAMERA_UP, CAMERA_FPS, QUEUE_DEPTH, RING_BYTES)


def forget_camera(camera_id: str) -> None:
    for metric in PER_CAMERA:
        try:
            metric.remove(camera_id)
        except KeyError:
            pass
    for label in REASON_LABELS.values():
        try:
            FRAMES_DROPPED.remove(camera_id, label)
        except KeyError:
            pass
