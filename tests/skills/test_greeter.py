"""Greeter over gRPC with the real face pipeline (BlazeFace landmarks, dlib templates, the anti-spoof and liveness
models): enrolment's consent and quality checks, encrypted templates, the driver recognised walking up to a side
camera (face stages switched on by the approach), face + fob fusion applying the profile as a vehicle action, a
printed-photo replay refused, the passenger's profile never applied, delete removes every trace."""
from __future__ import annotations

import json
from functools import cache

import cv2
import grpc
import numpy as np
import pytest

from incar.v1 import common_pb2, skills_pb2
from service.perception.identity import yaw_proxy
from service.perception.types import Detection
from tests.skills.conftest import vehicle
from tests.skills.greeter_scenes import (embed_faces, head_and_shoulders, largest, live_scene, liveness,
                                         printed_photo_scene)
from tests.skills.scenes import analysis, photo

NAME = "Alice Example"
PRESETS = {"seat": {"position": 4, "recline": 2}, "mirror": "left-2", "climate_c": 21.5}


def jpeg(image: np.ndarray) -> common_pb2.Image:
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=data.tobytes())


@cache
def cabin_photo():
    """faces1.jpg at half size, as a cabin camera frame: three people, the enrolled one on the image's left."""
    image = cv2.resize(photo("faces1.jpg"), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    return image, embed_faces(image)


def cabin(clock, image, faces):
    return analysis("cab-front", "cabin", "cabin_front", clock.advance(0.2), image, faces=faces,
                    stages=("faces", "identity"))


def side(clock, frame, faces=(), detections=()):
    return analysis("ext-left", "exterior", "left", clock.advance(0.2), frame, detections, faces=faces,
                    stages=("motion", "objects", "faces", "identity"))


async def enrol(r, **kw):
    return await r.stub("Greeter").Enroll(skills_pb2.EnrollRequest(
        name=NAME, consent=True, image=jpeg(head_and_shoulders()), key_fob_id="fob-1234",
        preferences_json=json.dumps(PRESETS), **kw))


def seat_actions(r):
    return [dict(row) for row in r.db.connect().execute("SELECT kind, seat, parameters_json FROM actions")]


async def test_enrolment_consent_quality_encryption_delete_and_restart(harness, clock):
    harness.face_embedder = embed_faces
    r = await harness.start()
    greeter = r.stub("Greeter")
    upload = jpeg(head_and_shoulders())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=False, image=upload))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "consent" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:   # several people of similar size: whose consent?
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, image=jpeg(photo("faces1.jpg"))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "similar size" in err.value.details()
    # The quality check: a head turned to the side (faces2's sofa face, yaw proxy ~0.5) is refused ...
    sofa = photo("faces2.jpg")
    turned = max(embed_faces(sofa), key=yaw_proxy)
    x1, y1, x2, y2 = (int(v) for v in turned.box)
    m = 2 * (x2 - x1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True,
                                                      image=jpeg(sofa[max(0, y1 - m):y2 + m, max(0, x1 - m):x2 + m])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "turned too far" in err.value.details()
    # ... and so is a face too small to make a good template.
    small = cv2.resize(head_and_shoulders(), None, fx=0.2, fy=0.2, interpolation=cv2.INTER_AREA)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, image=jpeg(small)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "px" in err.value.details()
    broken = common_pb2.Image(encoding=upload.encoding, data=upload.data[:200])   # decoded off the loop, refused
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.Enroll(skills_pb2.EnrollRequest(name=NAME, consent=True, image=broken))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("image.")

    profile = await enrol(r)
    assert profile.name == NAME and profile.face and 0 <= profile.enrol_yaw <= 0.35
    # Only the encrypted template is stored: no image file, and the blob is not the plain embedding.
    assert not [p for p in harness.tmp_path.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    blob = r.db.connect().execute("SELECT template FROM greeter_profiles").fetchone()["template"]
    assert len(blob) == 12 + 128 * 4 + 16
    enrolled = r.host.greeter.profiles.templates()[profile.profile_id][1]
    assert enrolled.astype("<f4").tobytes() not in blob

    r = await harness.restart()
    greeter = r.stub("Greeter")
    listed = (await greeter.ListProfiles(skills_pb2.ListProfilesRequest())).profiles
    assert [(p.profile_id, p.name, p.key_fob_id, p.face) for p in listed] == [(profile.profile_id, NAME, "fob-1234",
                                                                             True)]
    await greeter.DeleteProfile(skills_pb2.DeleteProfileRequest(profile_id=profile.profile_id))
    assert not (await greeter.ListProfiles(skills_pb2.ListProfilesRequest())).profiles
    r.db.close()
    raw = b"".join(p.read_bytes() for p in harness.tmp_path.glob("incar.db*"))
    assert NAME.encode() not in raw and profile.profile_id.encode() not in raw
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await greeter.DeleteProfile(skills_pb2.DeleteProfileRequest(profile_id=profile.profile_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_driver_walks_up_recognised_face_and_fob_apply_the_profile(harness, clock):
    harness.face_embedder = embed_faces
    switched = []
    r = await harness.start()
    r.host.greeter.connect_perception(liveness=liveness().check, face_stages=lambda cam, on: switched.append((cam, on)))
    profile = await enrol(r)
    await r.set_vehicle(vehicle(locked=True))
    subject = head_and_shoulders()
    # Someone walks up to the left camera: the person box grows -> the face stages switch on there.
    await r.frame(side(clock, live_scene(subject, 200), detections=[Detection("person", 0.9, (200, 60, 440, 480),
                                                                              looming=0.6)]))
    assert switched == [("ext-left", True)]
    for height in (260, 330, 420):   # closer with every frame; the face stage now runs on this camera
        frame = live_scene(subject, height)
        await r.frame(side(clock, frame, faces=embed_faces(frame)))
    greeting, = r.events_of("greeter.greeting")
    payload = json.loads(greeting.payload_json)
    assert NAME in greeting.message and payload["method"] == "face" and payload["camera_role"] == "exterior"
    assert not payload["applies_profile"] and not r.events_of("greeter.profile_apply")   # face alone: greet only
    assert payload["antispoof"] > 0.3 and payload["liveness"] > 0.15
    # The key fob comes into range: face + fob of the same profile -> the seat and mirror profile is applied.
    await r.set_vehicle(vehicle(locked=True, key_fob_id="fob-1234"))
    apply, = r.events_of("greeter.profile_apply")
    assert json.loads(apply.payload_json) == {"profile_id": profile.profile_id, "preferences": PRESETS,
                                              "method": "face+key_fob"}
    assert len(r.events_of("greeter.greeting")) == 1                        # no second greeting
    action, = seat_actions(r)
    assert action["kind"] == "seat_mirror_profile" and action["seat"] == 1   # SEAT_ID_DRIVER
    assert json.loads(json.loads(action["parameters_json"])["preferences_json"]) == PRESETS
    # Nobody for the approach time: the side camera goes back to its frugal stages.
    clock.advance(harness.config.greeter.approach_face_seconds + 1)
    await r.host.tick()
    assert switched[-1] == ("ext-left", False)


async def test_someone_standing_at_the_door_switches_the_face_stages_on(harness, clock):
    """A driver who has walked up and stopped at the handle no longer looms; a still passer-by far off is not
    worth dlib's time."""
    switched = []
    r = await harness.start()
    r.host.greeter.connect_perception(face_stages=lambda cam, on: switched.append((cam, on)))
    await r.set_vehicle(vehicle(locked=True))
    frame = live_scene(head_and_shoulders(), 200)
    far = Detection("person", 0.9, (300, 300, 340, 400), looming=0.0)          # a fifth of the frame, still
    await r.frame(side(clock, frame, detections=[far]))
    assert switched == []
    at_door = Detection("person", 0.9, (150, 40, 470, 480), looming=0.0)       # nine tenths of the frame, still
    await r.frame(side(clock, frame, detections=[at_door]))
    assert switched == [("ext-left", True)]


async def test_printed_photo_replay_is_refused(harness, clock):
    harness.face_embedder = embed_faces
    r = await harness.start()
    r.host.greeter.connect_perception(liveness=liveness().check)
    await enrol(r)
    harness.config.greeter.face_only_applies_profile = True     # even where a face alone would open the profile
    await r.set_vehicle(vehicle(locked=True))
    subject = head_and_shoulders()
    for i, (height, tilt) in enumerate(((300, 5.0), (340, -4.0), (380, 8.0))):   # held up, moved, turned
        frame = printed_photo_scene(subject, height, tilt_deg=tilt, seed=i)
        faces = embed_faces(frame)
        assert faces and r.host.greeter.match(largest(faces).embedding)     # it is the enrolled face ...
        await r.frame(side(clock, frame, faces=faces))
    refused = r.events_of("greeter.spoof_refused")                          # ... and it is refused
    assert refused and "photo or screen frame" in json.loads(refused[0].payload_json)["reason"]
    assert not r.events_of("greeter.greeting") and not r.events_of("greeter.profile_apply") and not seat_actions(r)
    # The refusal holds for the approach: a frame without the print's edge right after does not get through.
    live = live_scene(subject, 380)
    await r.frame(side(clock, live, faces=embed_faces(live)))
    assert not r.events_of("greeter.greeting")


async def test_passengers_profile_is_not_applied_the_drivers_seat_face_wins(harness, clock):
    harness.face_embedder = embed_faces
    r = await harness.start()
    r.host.greeter.connect_perception(liveness=liveness().check)
    profile = await enrol(r)
    image, faces = cabin_photo()
    enrolled = largest(faces)
    assert (enrolled.box[0] + enrolled.box[2]) / 2 < image.shape[1] / 2      # she sits on the image's left
    # Default zone: a rear-facing cabin camera sees the (left-hand-drive) driver on the image's right.
    await r.frame(cabin(clock, image, tuple(faces)))
    passenger = [json.loads(e.payload_json) for e in r.events_of("greeter.greeting")
                 if json.loads(e.payload_json).get("seat") == "passenger"]
    assert passenger and passenger[0]["profile_id"] == profile.profile_id and not passenger[0]["applies_profile"]
    assert not r.events_of("greeter.profile_apply") and not seat_actions(r)   # her face applied nothing
    n_applied = 0

    # Her in the driver's seat (the zone now the image's left): her face + her fob apply her profile.
    harness.config.greeter.driver_seat_zones = {"cabin_front": [0.0, 0.0, 0.5, 1.0]}
    harness.config.greeter.fob_only_applies_profile = False
    r = await harness.restart()
    r.host.greeter.connect_perception(liveness=liveness().check)
    await r.set_vehicle(vehicle(key_fob_id="fob-1234"))
    assert not r.events_of("greeter.profile_apply")[n_applied:]             # fob alone: policy says no
    await r.frame(cabin(clock, image, tuple(faces)))
    applied = r.events_of("greeter.profile_apply")[n_applied:]
    assert len(applied) == 1 and json.loads(applied[0].payload_json)["method"] == "face+key_fob"
