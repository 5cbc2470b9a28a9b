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


def test_snapshot_boxes_belong_to_the_frame_shown():
    """Detections found in an older frame are not drawn over a newer one (a cyclist who has gone)."""
    import numpy as np

    from service.cameras.ring import CameraFrame
    from service.liveview import MAX_BOX_AGE_SECONDS, LiveView
    from service.perception.types import Detection, FrameAnalysis

    image = np.zeros((64, 64, 3), np.uint8)

    class Hub:
        def __init__(self, when):
            self.frame = CameraFrame("left", "exterior", "left", when, when, image, image, 7)

        def latest(self, camera_id):
            return self.frame

        def camera_ids(self):
            return ["left"]

    class Context:
        async def abort(self, code, details):
            raise AssertionError(details)

    async def objects_when_shown(shown_at: float) -> list:
        view = LiveView(Hub(shown_at), stale_after_seconds=1e9)
        view.latest["left"] = FrameAnalysis("left", "exterior", "left", 100.0, image,
                                            detections=(Detection("bicycle", 0.9, (1, 2, 30, 40)),))
        snap = await view.GetSnapshot(liveview_pb2.GetSnapshotRequest(camera_id="left"), Context())
        return [o.label for o in snap.objects]

    async def both():
        return await objects_when_shown(100.0), await objects_when_shown(100.0 + MAX_BOX_AGE_SECONDS * 4)
    same, later = asyncio.run(both())
    assert same == ["bicycle"] and later == []
