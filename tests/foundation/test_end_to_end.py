"""The thin path end to end over a real port: frames in, perception and the model, skills, events out."""
from __future__ import annotations

import asyncio
import cv2
import grpc
import pytest

from incar.v1 import (assistant_pb2, assistant_pb2_grpc, cameras_pb2, cameras_pb2_grpc, common_pb2, events_pb2,
                      events_pb2_grpc)
from service.config import load_config
from service.server import Application
from tests.conftest import ROOT, base_overrides

IMAGES = ROOT / "deploy" / "sim" / "images"


@pytest.fixture
async def app(tmp_path):
    application = Application(load_config(env={}, overrides=base_overrides(tmp_path)))
    await application.start()
    await application.ready()
    yield application
    await application.stop(0.2)


async def stream_frames(channel, camera_id: str, path, count: int) -> list[cameras_pb2.FrameAck]:
    data = path.read_bytes()

    async def frames():
        for seq in range(count):
            frame = cameras_pb2.Frame(camera_id=camera_id, role=common_pb2.CAMERA_ROLE_EXTERIOR,
                                      position=common_pb2.MOUNT_POSITION_FRONT, sequence=seq,
                                      image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=data))
            frame.capture_time.GetCurrentTime()
            yield frame
            await asyncio.sleep(0.05)
    return [ack async for ack in cameras_pb2_grpc.CamerasStub(channel).StreamFrames(frames())]


async def test_frame_in_model_answer_out(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        acks = await stream_frames(ch, "front", IMAGES / "dog.jpg", 5)
        assert any(a.accepted for a in acks)
        pieces, done = [], None
        request = assistant_pb2.AskRequest(question="What is in front of the car?", camera_ids=["front"],
                                           max_tokens=24)
        async for item in assistant_pb2_grpc.AssistantStub(ch).Ask(request, timeout=120):
            if item.HasField("done"):
                done = item.done
            else:
                pieces.append(item.text)
        assert done is not None and done.handled_by == "model"
        assert done.answer == "".join(pieces) and done.answer.strip()
        assert done.timings.time_to_first_token_s > 0 and done.timings.generated_tokens > 0
        assert done.backend == "cpu"
        events = await events_pb2_grpc.EventsStub(ch).ListEvents(events_pb2.ListEventsRequest(kinds=["camera."]))
        assert [e.kind for e in events.events][:1] == ["camera.up"]


async def test_a_text_only_model_gets_what_perception_sees(app):
    description = await asyncio.to_thread(app.pipeline.describe_images, [cv2.imread(str(IMAGES / "dog.jpg"))])
    assert "dog" in description and "bicycle" in description


async def test_skill_questions_are_routed_to_the_skill(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        request = assistant_pb2.AskRequest(question="Where is my car?", route_to_skill=True)
        items = [item async for item in assistant_pb2_grpc.AssistantStub(ch).Ask(request, timeout=60)]
        done = items[-1].done
        assert done.handled_by == "car_finder"
        assert "no parking position" in done.answer.lower()

