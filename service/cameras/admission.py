"""Admission helpers for the camera hub: the enum names frames carry, the capture-time window, and the
latest-wins hand-off to analysis consumers."""
from __future__ import annotations

import asyncio

from incar.v1 import cameras_pb2, common_pb2
from service.cameras.frames import FrameError
from service.cameras.ring import CameraFrame

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
