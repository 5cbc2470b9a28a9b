"""Camera ingestion settings (the `cameras` section of the service config), with embedded defaults."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = ("cabin", "exterior")
POSITIONS = ("unspecified", "front", "rear", "left", "right", "cabin_front", "cabin_rear")
CAMERA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class CameraConfig:
    """A camera declared in config. `source` "" or "grpc": it streams itself over Cameras.StreamFrames;
    otherwise an OpenCV source the hub pulls: an image file or a folder of images (looped), a video file
    (looped), an rtsp://|rtsps://|http(s):// URL, or a V4L2 device (/dev/videoN or v4l2:N)."""
    id: str = ""
    role: str = "cabin"
    position: str = "unspecified"
    source: str = ""
    fps: float = 10.0   # pace for file/folder/video-file sources; live sources deliver at their own rate

    def validate(self) -> None:
        if not CAMERA_ID.match(self.id):
            raise ValueError(f"id: expected 1-64 characters [A-Za-z0-9._-], got {self.id!r}")
        if self.role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {self.role!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position: expected one of {', '.join(POSITIONS)}, got {self.position!r}")
        if not 0 < self.fps <= 240:
            raise ValueError(f"fps: must be in (0, 240], got {self.fps}")

    @property
    def pulled(self) -> bool:
        return self.source not in ("", "grpc")


@dataclass
class CamerasConfig:
    model_size: int = 768                     # frames are resized to model_size x model_size for analysis
    max_pixels: int = 4096 * 4096             # checked from the image header, before any decoding
    max_frame_age_seconds: float = 2.0        # older capture times are dropped as stale
    max_clock_ahead_seconds: float = 2.0      # capture times further ahead of the server clock are refused
    max_clock_behind_seconds: float = 86400.0  # ... and further behind it (a camera without a set clock)
    max_pending_frames: int = 1               # per camera, waiting for decode; beyond it the oldest is dropped
    decode_threads: int = 2
    ring_seconds: float = 10.0                # history kept per camera for pre-event clips
    ring_max_bytes: int = 256 * 1024 * 1024   # per camera (originals + resized), whichever limit hits first
    record_seconds: float = 25.0              # exterior frames kept encoded, at the camera's rate, for event clips
    watchdog_timeout_seconds: float = 3.0     # no frame for this long: the camera is down
    reconnect_initial_seconds: float = 0.5    # pulled sources: first retry delay, doubled up to the max
    reconnect_max_seconds: float = 30.0
    allow_unknown_cameras: bool = True        # cameras may register themselves with their first valid gRPC frame
    max_cameras: int = 16
    forget_after_seconds: float = 120.0       # a self-registered camera silent this long is unregistered
    max_unacked_frames: int = 8               # per stream: frames read but not yet acknowledged to the sender
    max_stream_fps: float = 120.0             # per stream: frames read per second at most (flooders wait)
    cameras: list[CameraConfig] = field(default_factory=list)

    def validate(self) -> None:
        if not 64 <= self.model_size <= 4096:
            raise ValueError(f"model_size: must be in 64..4096, got {self.model_size}")
        if self.max_pixels < self.model_size * self.model_size:
            raise ValueError(f"max_pixels: must be at least model_size^2 ({self.model_size ** 2})")
        if self.max_frame_age_seconds <= 0:
            raise ValueError("max_frame_age_seconds: must be > 0")
        if not 0 < self.max_clock_ahead_seconds <= 3600:
            raise ValueError(f"max_clock_ahead_seconds: must be in (0, 3600], got {self.max_clock_ahead_seconds}")
        if self.max_clock_behind_seconds < self.max_frame_age_seconds:
            raise ValueError("max_clock_behind_seconds: must be >= max_frame_age_seconds")
        if self.forget_after_seconds < self.watchdog_timeout_seconds:
            raise ValueError("forget_after_seconds: must be >= watchdog_timeout_seconds")
        if not 1 <= self.max_stream_fps <= 10_000:
            raise ValueError(f"max_stream_fps: must be in 1..10000, got {self.max_stream_fps}")
        if not 1 <= self.max_unacked_frames <= 1024:
            raise ValueError(f"max_unacked_frames: must be in 1..1024, got {self.max_unacked_frames}")
        if self.max_pending_frames < 1:
            raise ValueError("max_pending_frames: must be >= 1")
        if not 1 <= self.decode_threads <= 64:
            raise ValueError("decode_threads: must be in 1..64")
        if self.ring_seconds < 0:
            raise ValueError("ring_seconds: must be >= 0")
        if self.ring_max_bytes < 0:
            raise ValueError("ring_max_bytes: must be >= 0")
        if self.record_seconds < 0:
            raise ValueError("record_seconds: must be >= 0")
        if self.watchdog_timeout_seconds <= 0:
            raise ValueError("watchdog_timeout_seconds: must be > 0")
        if not 0 < self.reconnect_initial_seconds <= self.reconnect_max_seconds:
            raise ValueError("reconnect_initial_seconds: must be > 0 and <= reconnect_max_seconds")
        if self.max_cameras < 1:
            raise ValueError("max_cameras: must be >= 1")
        if len(self.cameras) > self.max_cameras:
            raise ValueError(f"cameras: {len(self.cameras)} declared, max_cameras is {self.max_cameras}")
        seen = set()
        for i, camera in enumerate(self.cameras):
            try:
                camera.validate()
            except ValueError as exc:
                raise ValueError(f"cameras[{i}].{exc}") from None
            if camera.id in seen:
                raise ValueError(f"cameras[{i}].id: {camera.id!r} declared twice")
            seen.add(camera.id)
