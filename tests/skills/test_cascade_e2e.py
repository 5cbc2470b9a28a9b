"""End to end through the real perception cascade (service.perception.cascade: motion gate, BlazeFace, dlib
identity, PP-OCR): camera frames in, FrameAnalysis to the skills, events and answers out."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service.cameras.ring import CameraFrame
from tests.skills.conftest import vehicle
from tests.skills.scenes import photo

NAME = "Alice Example"


@pytest.fixture(scope="module")
def perception():
    from service.perception.cascade import Cascade, PerceptionConfig
    from service.perception.faces import FaceDetector
    from service.perception.identity import FaceEmbedder
    from service.perception.build import ensure_built
    from service.perception.models import model_path
    ensure_built()
    detector, identity = FaceDetector(model_path("face_full"), "full"), FaceEmbedder()
    return Cascade(PerceptionConfig()), lambda bgr: identity.embed_faces(bgr, detector.detect(bgr))


def camera_frame(camera_id, role, position, t, image) -> CameraFrame:
    return CameraFrame(camera_id, role, position, t, t, image, image)


async def feed(r, cascade, frame: CameraFrame):
    analysis = cascade.analyze(frame.image, frame)
    r.frames.add(analysis)
    await r.host.on_analysis(analysis)
    await r.host.drain()
    return analysis


async def test_greeter_and_car_finder_through_the_cascade(harness, clock, perception):
    cascade, embedder = perception
    harness.face_embedder = embedder
    r = await harness.start()
    group = cv2.resize(photo("faces1.jpg"), (960, 640), interpolation=cv2.INTER_AREA)
    # Enrol from an uploaded photo of the driver alone (the left person of faces1.jpg).
    ok, jpeg = cv2.imencode(".jpg", group[120:400, 100:370])
    profile = await r.stub("Greeter").Enroll(skills_pb2.EnrollRequest(
        name=NAME, consent=True, image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=jpeg.tobytes())))

    # The two other people walk up (the right part of the photo): faces found, nobody greeted.
    others = np.ascontiguousarray(group[:, 400:])
    a = await feed(r, cascade, camera_frame("cab", "cabin", "cabin_front", clock.advance(0.5), others))
    assert "identity" in a.stages_run and len(a.faces) >= 2 and all(f.embedding is not None for f in a.faces)
    assert not r.events_of("greeter.greeting")
    # The whole group, the driver among them: greeted by name.
    a = await feed(r, cascade, camera_frame("cab", "cabin", "cabin_front", clock.advance(0.5), group))
    greeting, = r.events_of("greeter.greeting")
    assert NAME in greeting.message and json.loads(greeting.payload_json)["profile_id"] == profile.profile_id

    # Parking: the exterior camera's text stage reads the sign; Car Finder answers from it.
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=6.0))
    garage = cv2.resize(photo("dog.jpg"), (640, 480))
    cv2.rectangle(garage, (360, 30), (630, 200), (40, 40, 40), -1)
    for i, line in enumerate(("LEVEL U1", "BAY 230")):
        cv2.putText(garage, line, (375, 95 + 70 * i), cv2.FONT_HERSHEY_DUPLEX, 1.4, (255, 255, 255), 3)
    a = await feed(r, cascade, camera_frame("ext-front", "exterior", "front", clock.advance(0.5), garage))
    assert "text" in a.stages_run and a.texts
    await r.set_vehicle(vehicle(ignition=vehicle_pb2.IGNITION_OFF))
    reply = await r.stub("CarFinder").WhereIsMyCar(skills_pb2.WhereIsMyCarRequest())
    assert (reply.record.level, reply.record.bay) == ("U1", "230")
    assert "U1" in reply.answer and "230" in reply.answer
