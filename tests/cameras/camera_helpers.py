"""Helpers for the camera tests: real JPEGs, frames, metrics."""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
from prometheus_client import REGISTRY

from incar.v1 import cameras_pb2, cameras_pb2_grpc, common_pb2
from service.cameras.hub import CameraHub

DATA = Path(__file__).resolve().parents[2] / "deploy" / "sim" / "images"   # the repository's photo set
IMAGES = [DATA / name for name in ("dog.jpg", "horses.jpg", "person.jpg")]   # the camera tests' three scenes
MAX_MESSAGE = 8 * 1024 * 1024


def jpeg_bytes(name: str = "dog.jpg") -> bytes:
    return (DATA / name).read_bytes()


def unique(prefix: str) -> str:
    """Camera ids are unique per test: metrics live in the process-wide registry."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make_frame(camera_id: str, data: bytes | None = None, *, encoding=common_pb2.IMAGE_ENCODING_JPEG,
               role=common_pb2.CAMERA_ROLE_CABIN, position=common_pb2.MOUNT_POSITION_CABIN_FRONT,
               sequence: int = 0, capture_time: float | None = None, width: int = 0, height: int = 0):
    frame = cameras_pb2.Frame(camera_id=camera_id, role=role, position=position, sequence=sequence,
                              image=common_pb2.Image(encoding=encoding, width=width, height=height,
                                                     data=jpeg_bytes() if data is None else data))
    frame.capture_time.FromNanoseconds(int((time.time() if capture_time is None else capture_time) * 1e9))
    return frame


class Served:
    def __init__(self, hub: CameraHub, server: grpc.aio.Server, channel: grpc.aio.Channel, port: int = 0):
        self.hub, self.server, self.channel, self.port = hub, server, channel, port
        self.stub = cameras_pb2_grpc.CamerasStub(channel)




async def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll until predicate() is true; a generous deadline, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def lockstep(stub, frames):
    """Send each frame and wait for its ack, on one stream."""
    call = stub.StreamFrames()
    acks = []
    for frame in frames:
        await call.write(frame)
        acks.append(await call.read())
    await call.done_writing()
    return acks
