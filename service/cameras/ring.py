"""Per-camera history of decoded frames, bounded by age and by bytes, for pre-event clips and snapshots."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CameraFrame:
    """One decoded frame. Arrays are read-only: the same frame goes to the ring and to every consumer."""
    camera_id: str
    role: str                 # "cabin" | "exterior"
    position: str             # "front", "rear", "left", "right", "cabin_front", "cabin_rear", "unspecified"
    capture_time: float       # epoch seconds, from the camera
    received_time: float      # epoch seconds, when the hub got it
    image: np.ndarray = field(repr=False)     # BGR at the model's size (model_size x model_size)
    original: np.ndarray = field(repr=False)  # BGR as received, for clips and snapshots
    sequence: int = 0

    @property
    def nbytes(self) -> int:
        if self.image is self.original:
            return self.original.nbytes
        return self.image.nbytes + self.original.nbytes


class FrameRing:
    """Frames in capture order; drops the oldest beyond `seconds` (relative to the newest) or `max_bytes`."""

    def __init__(self, seconds: float, max_bytes: int):
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._frames: deque[CameraFrame] = deque()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    def append(self, frame: CameraFrame) -> None:
        self._frames.append(frame)
        self.nbytes += frame.nbytes
        oldest_kept = frame.capture_time - self.seconds
        # The newest frame always stays, even when it alone is over the byte budget.
        while len(self._frames) > 1 and (self._frames[0].capture_time < oldest_kept or self.nbytes > self.max_bytes):
            self.nbytes -= self._frames.popleft().nbytes

    def keep_latest(self) -> None:
        """Release the history, keeping only the newest frame (a camera that has gone quiet)."""
        while len(self._frames) > 1:
            self.nbytes -= self._frames.popleft().nbytes

    def clear(self) -> None:
        self._frames.clear()
        self.nbytes = 0

    def latest(self) -> CameraFrame | None:
        return self._frames[-1] if self._frames else None

    def since(self, capture_time: float) -> list[CameraFrame]:
        """Frames captured at or after `capture_time`, oldest first."""
        out = []
        for frame in reversed(self._frames):
            if frame.capture_time < capture_time:
                break
            out.append(frame)
        out.reverse()
        return out
