"""A camera that went quiet is never presented as the current view: Ask refuses its old frame with the reason,
and the HMI's snapshot says it is stale."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, common_pb2, liveview_pb2,
                      liveview_pb2_grpc)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import PHOTOS


async def wait_serving(channel, service: str, timeout: float = 120.0) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status != \
            health_pb2.HealthCheckResponse.SERVING:
        assert loop.time() < deadline, f"{service} not serving in {timeout}s"
        await asyncio.sleep(0.2)


async def send_one_frame(channel, camera_id: str) -> None:
    frame = cameras_pb2.Frame(camera_id=camera_id, role=common_pb2.CAMERA_ROLE_EXTERIOR,
                              position=common_pb2.MOUNT_POSITION_FRONT, sequence=1,
                              image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                     data=(PHOTOS / "dog.jpg").read_bytes()))
    frame.capture_time.GetCurrentTime()

    async def frames():
        yield frame
    acks = [ack async for ack in cameras_pb2_grpc.CamerasStub(channel).StreamFrames(frames())]
    assert acks and acks[0].accepted, acks


async def test_a_stale_frame_is_refused_not_described(server_process):
    server = server_process(["--set", "cameras.watchdog_timeout_seconds=1"]).start(timeout=120)
    async with grpc.aio.insecure_channel(server.target) as channel:
        await wait_serving(channel, "incar.v1.Assistant")
        await send_one_frame(channel, "front")
        fresh = await liveview_pb2_grpc.LiveViewStub(channel).GetSnapshot(
            liveview_pb2.GetSnapshotRequest(camera_id="front", max_width=320))
        assert not fresh.stale and fresh.image.width == 320 and fresh.image.data[:2] == b"\xff\xd8"

        await asyncio.sleep(2.5)          # past the watchdog: the camera is down, its frame is old
        stale = await liveview_pb2_grpc.LiveViewStub(channel).GetSnapshot(
            liveview_pb2.GetSnapshotRequest(camera_id="front"))
        assert stale.stale and stale.age_seconds > 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in assistant_pb2_grpc.AssistantStub(channel).Ask(
                    assistant_pb2.AskRequest(question="What do you see?", camera_ids=["front"], max_tokens=8),
                    timeout=30):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "front" in refused.value.details() and "s old" in refused.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await liveview_pb2_grpc.LiveViewStub(channel).GetSnapshot(
                liveview_pb2.GetSnapshotRequest(camera_id="nowhere"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "nowhere" in unknown.value.details()
