"""Greeter over gRPC with real dlib face templates: enrol from faces1.jpg with consent, greet that face by name
and no other, limited attempts with the key-fob fallback, encrypted templates, delete removes every trace,
profiles survive a restart."""
from __future__ import annotations

import json
from functools import cache

import cv2
import grpc
import numpy as np
import pytest

from incar.v1 import common_pb2, skills_pb2
from tests.skills.conftest import vehicle
from tests.skills.faces import dlib_face_embedder
from tests.skills.scenes import analysis, photo

NAME = "Alice Example"


@cache
def faces_of(name: str):
    """(half-size image, faces sorted by size, largest first) — computed once per session."""
    image = cv2.resize(photo(name), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    faces = sorted(dlib_face_embedder(image), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]),
                   reverse=True)
    return image, faces


def enrolment_image() -> bytes:
    """The largest face of faces1.jpg cut out with a margin, as the driver would upload it."""
    image, faces = faces_of("faces1.jpg")
    x1, y1, x2, y2 = faces[0].box
    m = (x2 - x1) * 0.6
    crop = image[max(0, int(y1 - m)):int(y2 + m), max(0, int(x1 - m)):int(x2 + m)]
    ok, data = cv2.imencode(".jpg", crop)
    assert ok
    return data.tobytes()


def cabin(clock, faces, image):
    return analysis("cab-front", "cabin", "cabin_front", clock.advance(0.2), image, faces=faces,
                    stages=("faces", "identity"))


async def test_enrol_greet_only_that_face_fallback_delete_and_restart(harness, clock):
    harness.face_embedder = dlib_face_embedder
    r = await harness.start()
    greeter = r.stub("Greeter")
    image1, faces1 = faces_of("faces1.jpg")
    image2, faces2 = faces_of("faces2.jpg")
    assert len(faces1) >= 3 and len(faces2) >= 1

    jpeg = enrolment_image()
    upload = common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=jpeg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=False, image=upload))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "consent" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:   # several people of similar size: whose consent?
        ok, group = cv2.imencode(".jpg", image1)
        await greeter.Enroll(skills_pb2.EnrollRequest(
            name=NAME, consent=True, image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                                                            data=group.tobytes())))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    presets = {"seat": {"position": 4, "recline": 2}, "mirror": "left-2", "climate_c": 21.5}
    profile = await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, image=upload,
                                                            key_fob_id="fob-1234",
                                                            preferences_json=json.dumps(presets)))
    assert profile.name == NAME and profile.profile_id

    # Only the encrypted template is stored: no image file, and the blob is not the plain embedding.
    data_dir = harness.tmp_path
    assert not [p for p in data_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    blob = r.db.connect().execute("SELECT template FROM greeter_profiles").fetchone()["template"]
    assert len(blob) == 12 + 128 * 4 + 16
    enrolled = r.host.greeter._load_templates()[profile.profile_id][1]
    assert enrolled.astype("<f4").tobytes() not in blob
    assert float(np.linalg.norm(enrolled - faces1[0].embedding)) < 0.3   # the same face as in the full photo

    # Other faces (the two others in faces1, the people in faces2): no greeting.
    for face in faces1[1:3]:
        await r.frame(cabin(clock, (face,), image1))
    await r.frame(cabin(clock, tuple(faces2), image2))
    assert not r.events_of("greeter.greeting")
    # The enrolled face, among the others: greeted by name, presets applied.
    await r.frame(cabin(clock, tuple(faces1), image1))
    greeting, = r.events_of("greeter.greeting")
    assert NAME in greeting.message
    assert json.loads(greeting.payload_json)["method"] == "face"
    apply, = r.events_of("greeter.profile_apply")
    assert json.loads(apply.payload_json)["preferences"] == presets

    # Limited attempts: after max_attempts unknown faces the biometric path gives up for this approach ...
    clock.advance(harness.config.greeter.greet_cooldown_seconds + 1)
    for _ in range(harness.config.greeter.max_attempts):
        await r.frame(cabin(clock, (faces1[1],), image1))
    assert r.events_of("greeter.not_recognised")
    await r.frame(cabin(clock, (faces1[0],), image1))
    assert len(r.events_of("greeter.greeting")) == 1
    # ... and the key fob still works.
    await r.set_vehicle(vehicle(key_fob_id="fob-1234"))
    fob_greeting = r.events_of("greeter.greeting")[-1]
    assert json.loads(fob_greeting.payload_json)["method"] == "key_fob" and NAME in fob_greeting.message

    # Restart: the profile and its template are still there and still decrypt.
    r = await harness.restart()
    greeter = r.stub("Greeter")
    listed = (await greeter.ListProfiles(skills_pb2.ListProfilesRequest())).profiles
    assert [(p.profile_id, p.name, p.key_fob_id) for p in listed] == [(profile.profile_id, NAME, "fob-1234")]
    await r.frame(cabin(clock, (faces1[0],), image1))
    assert len(r.events_of("greeter.greeting")) == 3

    # Delete removes every trace: the row, the greetings naming the person, and the bytes on disk.
    await greeter.DeleteProfile(skills_pb2.DeleteProfileRequest(profile_id=profile.profile_id))
    assert not (await greeter.ListProfiles(skills_pb2.ListProfilesRequest())).profiles
    assert not [e for e in r.events.after(0, 10_000) if profile.profile_id in e.payload_json]
    r.db.close()
    raw = b"".join(p.read_bytes() for p in data_dir.glob("incar.db*"))
    assert NAME.encode() not in raw and profile.profile_id.encode() not in raw
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.DeleteProfile(skills_pb2.DeleteProfileRequest(profile_id=profile.profile_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_enrol_from_camera_and_without_key(harness, clock):
    harness.face_embedder = dlib_face_embedder
    harness.config.greeter.profile_key = ""
    r = await harness.start()
    greeter = r.stub("Greeter")
    crop = cv2.imdecode(np.frombuffer(enrolment_image(), np.uint8), cv2.IMREAD_COLOR)
    r.frames.add(analysis("cab-front", "cabin", "cabin_front", clock(), crop))
    with pytest.raises(grpc.aio.AioRpcError) as err:     # no key configured: nothing biometric is stored
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, camera_id="cab-front"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "INCAR_PROFILE_KEY" in err.value.details()

    from tests.skills.conftest import PROFILE_KEY
    harness.config.greeter.profile_key = PROFILE_KEY
    r = await harness.restart()
    greeter = r.stub("Greeter")
    r.frames.add(analysis("cab-front", "cabin", "cabin_front", clock(), crop))
    profile = await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, camera_id="cab-front"))
    assert profile.name == NAME
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, camera_id="no-such-camera"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, image=common_pb2.Image(
            encoding=common_pb2.IMAGE_ENCODING_JPEG, data=b"not a jpeg")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
