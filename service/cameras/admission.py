"""Admission helpers for the camera hub: the enum names frames carry, the capture-time window, and the
latest-wins hand-off to analysis consumers, and what the hub knows of each camera."""
from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

from incar.v1 import cameras_pb2, common_pb2
from service.cameras.frames import FrameError
from service.cameras.lane import DecodeLane
from service.cameras.ring import CameraFrame, FrameRing

FPS_WINDOW = 30

ROLE_NAMES = {common_pb2.CAMERA_ROLE_CABIN: "cabin", common_pb2.CAMERA_ROLE_EXTERIOR: "exterior"}
ROLE_VALUES = {name: value for value, name in ROLE_NAMES.items()}
POSITION_NAMES = {value: name[len("MOUNT_POSITION_"):].lower()
                  for name, value in common_pb2.MountPosition.items()}
POSITION_VALUES = {name: value for value, name in POSITION_NAMES.items()}


class LatestFrames:
    """The newest undelivered frame per camera; a newer frame replaces an undelivered one (latest-wins)."""

    def __init__(self):
        self.latest: dict[str, CameraFrame] = {}
        self.ready = asyncio.Event()

    def offer(self, frame: CameraFrame) -> None:
        self.latest.pop(frame.camera_id, None)   # re-insert at the end: cameras waiting longer go first
        self.latest[frame.camera_id] = frame
        self.ready.set()

    async def get(self) -> CameraFrame:
        while not self.latest:
            self.ready.clear()
            await self.ready.wait()
        return self.latest.pop(next(iter(self.latest)))


def capture_seconds(frame: cameras_pb2.Frame, received: float, ahead: float, behind: float) -> float:
    """The frame's capture time, refused (FrameError) outside [received - behind, received + ahead]: a clock
    80 years ahead would make every later real frame OUT_OF_ORDER, and 2^40 s is not a representable time."""
    if not frame.HasField("capture_time"):
        return received   # a camera without a clock: its frame is as old as its arrival
    stamp = frame.capture_time
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise FrameError("capture_time.nanos", f"expected 0..999999999, got {stamp.nanos}")
    seconds = stamp.seconds + stamp.nanos / 1e9
    if seconds > received + ahead:
        raise FrameError("capture_time", f"{seconds - received:.3f} s ahead of the server clock "
                                         f"(max_clock_ahead_seconds is {ahead:g})")
    if seconds < received - behind:
        raise FrameError("capture_time", f"{received - seconds:.0f} s behind the server clock "
                                         f"(max_clock_behind_seconds is {behind:g})")
    return seconds


@dataclass
class CameraState:
    """One registered camera: identity, its ring and decode lane, ordering and liveness, counters."""
    id: str
    role: str
    position: str
    source: str
    ring: FrameRing
    lane: DecodeLane
    pulled: bool = False
    declared: bool = False
    last_admitted_capture: float = -math.inf
    last_rate_capture: float = -math.inf
    last_alive: float | None = None          # monotonic
    last_frame_time: float | None = None     # capture time of the newest stored frame
    last_frame_age: float = 0.0
    up: bool = False
    state_reason: str = "no frame yet"
    accepted: int = 0
    dropped: int = 0
    accepted_at: deque = field(default_factory=lambda: deque(maxlen=FPS_WINDOW))

    def fps(self, now: float, timeout: float) -> float:
        if len(self.accepted_at) < 2 or now - self.accepted_at[-1] > timeout:
            return 0.0
        span = self.accepted_at[-1] - self.accepted_at[0]
        return (len(self.accepted_at) - 1) / span if span > 0 else 0.0
