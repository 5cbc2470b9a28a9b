"""Camera ingestion: gRPC streams and OpenCV sources in, decoded frames and short history out."""
from service.cameras.config import CameraConfig, CamerasConfig
from service.cameras.frames import FrameError
from service.cameras.hub import CameraHub, CameraLimitError, UnknownCameraError
from service.cameras.ring import CameraFrame

__all__ = ["CameraConfig", "CamerasConfig", "CameraFrame", "CameraHub", "CameraLimitError", "FrameError",
           "UnknownCameraError"]
