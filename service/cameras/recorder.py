"""Every admitted exterior frame, as the camera sent it, for event clips at the camera's own frame rate.

The analysis ring (`ring.FrameRing`) holds decoded frames at the rate the power governor lets through (2 fps in
sentry mode). Clips must show what the camera saw, so the hub also hands this recorder each admitted frame
before the rate limit, still encoded: no decode is spent on frames nobody analyses, a JPEG frame costs its
bytes (~40 KB at 640x480), and a clip can store those bytes unchanged. Bounded per camera by age (relative to
the camera's newest frame) and bytes, like the ring. Cabin cameras are not recorded (privacy).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.cameras.frames import JPEG, ImageSpec, decode


@dataclass(frozen=True)
class RecordedFrame:
    camera_id: str
    position: str
    capture_time: float
    spec: ImageSpec | None = None           # how `data` is encoded (gRPC frames)
    data: bytes = field(default=b"", repr=False)
    decoded: np.ndarray | None = field(default=None, repr=False)   # OpenCV sources: already BGR

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.decoded is None else self.decoded.nbytes

    @property
    def is_jpeg(self) -> bool:
        return self.decoded is None and self.spec is not None and self.spec.encoding == JPEG

    def bgr(self) -> np.ndarray:
        """The frame as BGR (decodes; call off the event loop)."""
        return self.decoded if self.decoded is not None else decode(self.spec, self.data)


class FrameRecorder:
    def __init__(self, seconds: float, max_bytes: int):
        self.seconds, self.max_bytes = seconds, max_bytes
        self._frames: dict[str, deque[RecordedFrame]] = {}
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()   # added on the loop, read from clip-writing threads

    def add(self, frame: RecordedFrame) -> None:
        with self._lock:
            frames = self._frames.setdefault(frame.camera_id, deque())
            frames.append(frame)
            total = self._bytes.get(frame.camera_id, 0) + frame.nbytes
            oldest_kept = frame.capture_time - self.seconds
            while len(frames) > 1 and (frames[0].capture_time < oldest_kept or total > self.max_bytes):
                total -= frames.popleft().nbytes
            self._bytes[frame.camera_id] = total

    def frames(self, camera_id: str, since: float, until: float = float("inf")) -> list[RecordedFrame]:
        """Recorded frames with since <= capture_time <= until, oldest first."""
        with self._lock:
            return [f for f in self._frames.get(camera_id, ()) if since <= f.capture_time <= until]

    def camera_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._frames)

    def drop(self, camera_id: str) -> None:
        """Release a camera's frames (it left)."""
        with self._lock:
            self._frames.pop(camera_id, None)
            self._bytes.pop(camera_id, None)

    def nbytes(self, camera_id: str) -> int:
        with self._lock:
            return self._bytes.get(camera_id, 0)
