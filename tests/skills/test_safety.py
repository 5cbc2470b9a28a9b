"""Safety over gRPC, child presence: a still occupant found by the real detectors on the frames they analysed,
escalated through the ladder of vehicle actions on schedule, durable across a restart; the close-up trigger
of an unlocked car; pets apart; items left behind sent to the owner; wrong states stay quiet."""
from __future__ import annotations

import json

import grpc
import pytest

from incar.v1 import actions_pb2, skills_pb2, vehicle_pb2
from service.perception.types import Detection
from tests.skills.conftest import vehicle
from tests.skills.scenes import analysis, background, paste, photo

EMPTY_SEATS = [(vehicle_pb2.SEAT_ID_DRIVER, vehicle_pb2.OCCUPANCY_EMPTY),
               (vehicle_pb2.SEAT_ID_REAR_LEFT, vehicle_pb2.OCCUPANCY_EMPTY)]
FRONT_LEFT = vehicle_pb2.DOOR_ID_FRONT_LEFT


@pytest.fixture(scope="session")
def detectors():
    from service.perception.age import AgeEstimator
    from service.perception.build import build
    from service.perception.faces import FaceDetector
    from service.perception.models import model_path
    build(quantize=False, progress=lambda line: None)   # the CPU runs the float graphs
    faces, age = FaceDetector(model_path("face_full"), "full"), AgeEstimator(model_path("age"))
    return lambda frame: age.annotate(frame, faces.detect(frame))


def cabin_with_occupant():
    """The rear bench seen from the cabin camera, someone sitting on it (a face crop from faces1.jpg)."""
    frame = background(seed=7)
    paste(frame, photo("faces1.jpg")[380:760, 760:1110], (380, 230, 560, 425))
    return frame


def action_kinds(r) -> list[str]:
    rows = r.db.connect().execute("SELECT kind FROM actions ORDER BY created, rowid").fetchall()
    return [row["kind"] for row in rows]


def levels(r, prefix="safety.child_left_behind"):
    return [json.loads(e.payload_json)["escalation_level"] for e in r.events_of(prefix)]


async def lock_and_confirm(r, clock, frame, faces, camera="cab-rear"):
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))
    for _ in range(3):
        await r.frame(analysis(camera, "cabin", "cabin_rear", clock.advance(2.0), frame, faces=faces,
                               stages=("motion", "faces", "age")))


async def test_a_still_occupant_is_confirmed_over_analysed_frames_only(harness, clock, detectors):
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))
    frame = cabin_with_occupant()
    faces = detectors(frame)
    assert faces and all(f.age is not None and f.age >= 18 for f in faces)   # an adult's face: estimated adult
    for i in range(3):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(2.0), frame, faces=faces,
                               stages=("motion", "faces", "age")))
        for _ in range(9):      # the gated frames between (nothing moved, no detector ran): no evidence either way
            await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(0.2), frame, stages=("motion",)))
        if i < 2:
            assert not r.events_of("safety.child")
    first, = r.events_of("safety.child_left_behind")
    payload = json.loads(first.payload_json)
    assert payload["escalation_level"] == 1 and payload["actions"] == ["cabin_warning"]
    occupant, = payload["occupants"]
    assert occupant["kind"] == "person" and occupant["estimate"] == "adult" and "face" in occupant["cues"]
    assert occupant["seat"] == "rear_left" and first.message.startswith("Child presence warning")


async def test_the_ladder_runs_on_schedule_with_vehicle_actions_and_stops_when_acknowledged(harness, clock,
                                                                                         detectors):
    r = await harness.start()
    frame = cabin_with_occupant()
    await lock_and_confirm(r, clock, frame, detectors(frame))
    detected_at = clock()
    fired = {}
    for _ in range(200):
        clock.advance(1.0)
        await r.host.tick()
        for e in r.events_of("safety.child_left_behind"):
            p = json.loads(e.payload_json)
            fired.setdefault((p["escalation_level"], p.get("notification", 0)), round(clock() - detected_at))
    ladder = harness.config.safety.escalation
    assert [fired[(i + 1, 0)] for i in range(1, len(ladder))] == [s.after_seconds for s in ladder[1:]]
    assert fired[(3, 2)] == 90 and fired[(4, 3)] == 150                  # the owner is told again every 60 s
    assert action_kinds(r) == ["owner_notification", "horn", "hazard_lights", "owner_notification", "climate_on",
                               "window_vent", "owner_notification", "emergency_call"]
    first = r.events_of("safety.child_left_behind")[0]
    status = await r.stub("Safety").GetStatus(skills_pb2.SafetyStatusRequest())
    active, = status.active
    assert active.event_cursor == first.cursor and active.escalation_level == len(ladder)
    await r.stub("Safety").Acknowledge(skills_pb2.AcknowledgeRequest(event_cursor=first.cursor))
    assert r.events_of("safety.child_left_behind_resolved")
    states = {row["kind"]: row["state"] for row in r.db.connect().execute("SELECT kind, state FROM actions")}
    assert states["hazard_lights"] == states["climate_on"] == actions_pb2.ACTION_STATE_CANCELLED   # stopped with it
    count = len(r.events_of("safety.child_left_behind"))
    clock.advance(600)
    await r.host.tick()
    assert len(r.events_of("safety.child_left_behind")) == count
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await r.stub("Safety").Acknowledge(skills_pb2.AcknowledgeRequest(event_cursor=first.cursor))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_restart_mid_escalation_resumes_at_the_same_level_on_the_same_timeline(harness, clock, detectors):
    r = await harness.start()
    frame = cabin_with_occupant()
    await lock_and_confirm(r, clock, frame, detectors(frame))
    detected_at = clock()
    clock.advance(31)
    await r.host.tick()
    assert levels(r) == [1, 2]
    r = await harness.restart()
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))    # the gateway re-sends the same state
    active, = (await r.stub("Safety").GetStatus(skills_pb2.SafetyStatusRequest())).active
    assert active.escalation_level == 2 and active.kind == "child_left_behind"
    clock.advance(28)       # t = 59 s: nothing yet
    await r.host.tick()
    assert levels(r) == [1, 2]
    clock.advance(1)        # t = 60 s: horn and hazards, on the original timeline
    await r.host.tick()
    assert levels(r) == [1, 2, 3] and round(clock() - detected_at) == 60
    assert action_kinds(r).count("horn") == 1
    await r.stub("Safety").Acknowledge(skills_pb2.AcknowledgeRequest(event_cursor=active.event_cursor))
    assert not (await r.stub("Safety").GetStatus(skills_pb2.SafetyStatusRequest())).active


async def test_a_lock_the_process_never_saw_is_watched_after_a_restart(harness, clock, detectors):
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))
    r.db.connect().execute("DELETE FROM safety_state")                  # as if locked before this build ran
    r = await harness.restart()
    locked = vehicle(locked=True, seats=EMPTY_SEATS)
    for skill in r.host.skills:     # the host seeds the stored state at start: no lock transition is seen
        skill.vehicle = locked
    r.state = locked
    frame = cabin_with_occupant()
    for _ in range(3):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(2.0), frame, faces=detectors(frame),
                               stages=("motion", "faces")))
    assert r.events_of("safety.child_left_behind")


async def test_doors_closing_on_an_unlocked_car_with_nobody_at_the_wheel_start_monitoring(harness, clock, detectors):
    r = await harness.start()
    frame = cabin_with_occupant()
    faces = detectors(frame)
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, True, False)], seats=EMPTY_SEATS))
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, False, False)], seats=EMPTY_SEATS))   # closed, unlocked
    for _ in range(3):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(2.0), frame, faces=faces,
                               stages=("motion", "faces")))
    first, = r.events_of("safety.child_left_behind")
    assert json.loads(first.payload_json)["watch"] == "closed_with_occupant"
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, True, False)], seats=EMPTY_SEATS))     # someone came back
    assert r.events_of("safety.child_left_behind_resolved")


async def test_closing_up_with_the_driver_seated_or_an_empty_cabin_raises_nothing(harness, clock, detectors):
    r = await harness.start()
    seated = [(vehicle_pb2.SEAT_ID_DRIVER, vehicle_pb2.OCCUPANCY_OCCUPIED)]
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, True, False)], seats=seated))
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, False, False)], seats=seated))
    frame = cabin_with_occupant()
    for _ in range(4):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(2.0), frame,
                               faces=detectors(frame), stages=("motion", "faces")))
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))
    empty = background(seed=7)
    for _ in range(5):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(2.0), empty,
                               faces=detectors(empty), stages=("motion", "faces")))
    clock.advance(120)
    await r.host.tick()
    assert not r.events_of("safety.")


async def test_a_dog_alone_is_reported_as_a_pet(harness, clock):
    from service.perception.build import build
    from service.perception.models import model_path
    from service.perception.objects import ObjectDetector
    build(quantize=False, progress=lambda line: None)   # the CPU runs the float graphs
    dog = photo("dog.jpg")
    detections = ObjectDetector(model_path("objects")).detect(dog)
    assert any(d.label == "dog" for d in detections) and not any(d.label == "person" for d in detections)
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))
    for _ in range(3):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(2.0), dog, detections=detections,
                               stages=("motion", "objects")))
    assert not r.events_of("safety.child_left_behind")
    first, = r.events_of("safety.pet_left_behind")
    pet, = json.loads(first.payload_json)["occupants"]
    assert pet["kind"] == "pet" and pet["estimate"] == "dog" and "pet" in first.message.lower()
    clock.advance(30)
    await r.host.tick()
    assert "owner_notification" in action_kinds(r)


async def test_items_left_behind_are_sent_to_the_owner_with_seat_and_item(harness, clock):
    r = await harness.start()
    frame = background(seed=2)
    phone = Detection("cell phone", 0.7, (520, 300, 560, 330))     # image right: the car's rear left seat
    bag = Detection("backpack", 0.8, (100, 250, 220, 400))          # image left: rear right
    occupied = [(vehicle_pb2.SEAT_ID_DRIVER, vehicle_pb2.OCCUPANCY_OCCUPIED)]
    await r.set_vehicle(vehicle(seats=occupied, doors=[(FRONT_LEFT, True, False)]))
    await r.set_vehicle(vehicle(seats=occupied))
    for _ in range(4):     # the driver still sits there: nothing is "left behind"
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(1), frame, detections=[phone],
                               stages=("motion", "objects")))
    assert not r.events_of("safety.item_left_behind")
    await r.set_vehicle(vehicle(seats=EMPTY_SEATS, doors=[(FRONT_LEFT, True, False)]))   # the driver gets out
    await r.set_vehicle(vehicle(seats=EMPTY_SEATS))                                       # door closes
    await r.set_vehicle(vehicle(locked=True, seats=EMPTY_SEATS))                          # and locks
    for _ in range(4):
        await r.frame(analysis("cab-rear", "cabin", "cabin_rear", clock.advance(1), frame,
                               detections=[phone, bag], stages=("motion", "objects")))
    found = sorted((json.loads(e.payload_json)["seat"], json.loads(e.payload_json)["item"])
                   for e in r.events_of("safety.item_left_behind"))
    assert found == [("rear_left", "cell phone"), ("rear_right", "backpack")]     # once each per locked period
    bodies = [json.loads(row["parameters_json"])["body"] for row in r.db.connect().execute(
        "SELECT parameters_json FROM actions WHERE kind = 'owner_notification'")]
    assert sorted(bodies) == ["A backpack was left on the rear right seat.",
                              "A cell phone was left on the rear left seat."]
    routed = await r.host.router.answer("Did I forget something in the car?")
    assert routed.skill == "safety" and "cell phone" in routed.answer
    await r.set_vehicle(vehicle(locked=False, seats=EMPTY_SEATS))     # owner back: alerts resolved
    assert not (await r.stub("Safety").GetStatus(skills_pb2.SafetyStatusRequest())).active
