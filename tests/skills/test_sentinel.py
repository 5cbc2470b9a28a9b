"""Sentinel over gRPC: per-person dwell, approach vs pass-by from geometry-consistent scenes, a hand at the door
handle (pose), clips from every exterior camera with footage before and after the event, vehicle actions,
arming rules, masks and confirmation, retention."""
from __future__ import annotations

import json

import cv2
import grpc
import numpy as np
import pytest

from incar.v1 import skills_pb2, vehicle_pb2
from skills.config import SavedPlace
from tests.skills.conftest import vehicle
from tests.skills.scenes import RingFrames
from tests.skills.sentinel_scenes import frame_analysis, person_box_at, scene, wrist_pose

FPS = 10
LEFT, RIGHT = "ext-left", "ext-right"


def short_clips(harness, pre=2.0, post=2.0):
    harness.config.sentinel.pre_event_seconds = pre
    harness.config.sentinel.post_event_seconds = post


async def play(r, clock, seconds: float, left=(), right=None, *, fps=FPS, seed=0, poses=None, skip=()):
    """`seconds` of frames from both side cameras. `left`: people (distance, lateral) or a function of the frame
    index returning them; `right`: the same for the right camera (None: an empty street there)."""
    for i in range(int(round(seconds * fps))):
        t = clock.advance(1 / fps)
        for cam, position, people in ((LEFT, "left", left), (RIGHT, "right", right or ())):
            now = people(i) if callable(people) else people
            if cam == LEFT and i in skip:      # the detector missed this frame
                now = ()
            frame, dets = scene(now, seed=seed + i)
            pose = poses(i, dets) if (poses and cam == LEFT) else ()
            stages = ("motion", "objects", "pose") if poses else ("motion", "objects")
            await r.frame(frame_analysis(cam, position, t, frame, dets, pose, stages=stages), drain=False)
    await r.host.drain()


def status(r):
    return r.stub("Sentinel").GetStatus(skills_pb2.SentinelStatusRequest())


async def test_linger_then_hand_at_handle_clips_every_camera_before_and_after_with_actions(harness, clock):
    harness.frames = RingFrames(seconds=25.0)      # as long as the hub's recorder keeps frames
    r = await harness.start()
    sentinel = r.stub("Sentinel")
    assert (await status(r)).state == skills_pb2.SENTINEL_STATE_DISARMED
    await r.set_vehicle(vehicle(locked=True))
    assert (await status(r)).state == skills_pb2.SENTINEL_STATE_STANDBY

    await play(r, clock, 10.0)                                     # an empty street: pre-event footage
    await play(r, clock, 4.0, [(3.0, -1.0)])                       # near (3 m), not long enough yet
    assert (await status(r)).state == skills_pb2.SENTINEL_STATE_STANDBY
    await play(r, clock, 1.5, [(3.0, -1.0)])                       # lingering > 5 s -> Alert
    assert (await status(r)).state == skills_pb2.SENTINEL_STATE_ALERT
    alert, = r.events_of("sentinel.alert")
    payload = json.loads(alert.payload_json)
    assert payload["trigger"] == "linger" and 2.5 < payload["distance_m"] < 3.5 and payload["track_id"] is not None

    # The person steps to the car and puts a hand on the rear door handle (left camera zone 0.60-0.75, 0.35-0.60).
    handle = (0.67 * 640, 0.47 * 480)
    await play(r, clock, 0.5, [(1.5, 0.0)], poses=lambda i, dets: [wrist_pose(dets[0].box, handle)])
    assert (await status(r)).state == skills_pb2.SENTINEL_STATE_ALARM
    alarm, = r.events_of("sentinel.alarm")
    payload = json.loads(alarm.payload_json)
    assert payload["trigger"] == "handle" and "a hand at a door handle" in payload["reason"]
    assert alarm.severity > alert.severity and alarm.message

    # Vehicle actions: the Alert flashed the headlights; the Alarm sounds the horn and notifies the owner.
    rows = r.db.connect().execute("SELECT kind, cause_cursor FROM actions ORDER BY created").fetchall()
    by_cause = {}
    for row in rows:
        by_cause.setdefault(row["cause_cursor"], []).append(row["kind"])
    assert by_cause[alert.cursor] == ["headlight_flash"]
    assert sorted(by_cause[alarm.cursor]) == ["headlight_flash", "horn", "owner_notification"]

    # The clip is still recording its post-event footage: not downloadable yet.
    clip_id = payload["clip_id"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in sentinel.GetClip(skills_pb2.GetClipRequest(clip_id=clip_id))]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "recording" in err.value.details()
    await play(r, clock, 10.5, [(1.5, 0.0)])                        # post-event footage
    saved = [e for e in r.events_of("sentinel.clip_saved") if json.loads(e.payload_json)["clip_id"] == clip_id]
    assert saved

    clip = next(c for c in (await sentinel.ListClips(skills_pb2.ListClipsRequest())).clips if c.clip_id == clip_id)
    assert clip.complete and clip.level == "alarm" and clip.trigger == "handle" and clip.zone == "left"
    assert {c.camera_id for c in clip.cameras} == {LEFT, RIGHT}
    for cam in clip.cameras:   # 10 s + 10 s at the cameras' 10 fps
        assert cam.frames_before_event >= 95 and cam.frame_count >= 195, cam
        assert 9.5 <= cam.frames_per_second <= 10.5
    assert clip.event_time.ToSeconds() - clip.start_time.ToSeconds() >= 9.5
    assert clip.end_time.ToSeconds() - clip.event_time.ToSeconds() >= 9.5

    chunks = [c async for c in sentinel.GetClip(skills_pb2.GetClipRequest(clip_id=clip_id))]
    assert chunks[0].name == "snapshot.jpg"
    right = [c async for c in sentinel.GetClip(skills_pb2.GetClipRequest(clip_id=clip_id, camera_id=RIGHT))]
    assert {c.camera_id for c in right} == {RIGHT}
    jpegs = [c for c in right if c.name.endswith(".jpg")]
    index = json.loads(b"".join(c.data for c in right if c.name.endswith("index.json")))
    assert len(jpegs) == len(index) == next(c.frame_count for c in clip.cameras if c.camera_id == RIGHT)
    first = cv2.imdecode(np.frombuffer(jpegs[0].data, np.uint8), cv2.IMREAD_COLOR)
    assert first.shape == (480, 640, 3)
    assert clip.size_bytes == sum(len(c.data) for c in chunks)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in sentinel.GetClip(skills_pb2.GetClipRequest(clip_id=clip_id, camera_id="ext-nope"))]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Quiet for the cool-down: back to Standby. Clips survive a restart byte for byte.
    await play(r, clock, 1.0)
    clock.advance(harness.config.sentinel.cooldown_seconds)
    await r.host.tick()
    assert (await status(r)).state == skills_pb2.SENTINEL_STATE_STANDBY
    r = await harness.restart()
    again = [c async for c in r.stub("Sentinel").GetClip(skills_pb2.GetClipRequest(clip_id=clip_id))]
    assert b"".join(c.data for c in again) == b"".join(c.data for c in chunks)


async def test_pass_by_and_two_passers_in_a_row_do_not_alert_a_missed_frame_keeps_dwell(harness, clock):
    short_clips(harness)
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    # A passer-by walks across the left camera's view 3 m out, 4 s inside the near zone: no Alert.
    await play(r, clock, 4.0, lambda i: [(3.0, -2.0 + 4.0 * i / 40)])
    await play(r, clock, 1.0)             # gone for a second: where the first left, the tracker may join the two
    # A second one right after: the old per-camera timer added the two up; walking past never counts as lingering.
    await play(r, clock, 4.0, lambda i: [(3.2, 2.0 - 4.0 * i / 40)])
    assert not r.events_of("sentinel.al")
    watch = r.host.sentinel._watches[LEFT]
    assert all(t.motion == "pass-by" for t in watch.tracks.values())
    await play(r, clock, 3.0)
    # Someone standing 6 s at 3.5 m, with every 7th frame missed by the detector: one person, one dwell -> Alert.
    await play(r, clock, 6.0, [(3.5, 0.5)], skip=set(range(3, 60, 7)))
    alert, = r.events_of("sentinel.alert")
    assert json.loads(alert.payload_json)["trigger"] == "linger"


async def test_approach_alerts_before_the_linger_time_far_people_do_not(harness, clock):
    short_clips(harness)
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    await play(r, clock, 8.0, [(9.0, 1.0)])                            # standing far away: nothing
    assert not r.events_of("sentinel.al")
    await play(r, clock, 3.5, lambda i: [(max(2.0, 8.0 - 6.0 * i / 30), 0.5)])   # walks at the car, 8 m -> 2 m
    alert, = r.events_of("sentinel.alert")
    payload = json.loads(alert.payload_json)
    assert payload["trigger"] == "approach" and payload["motion"] == "approach"
    assert payload["distance_m"] <= harness.config.sentinel.approach_alert_distance_m


async def test_intrusion_sensors_alarm_with_actions_and_bad_values_are_refused(harness, clock):
    from service.vehicle import validate_state
    short_clips(harness)
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    await play(r, clock, 2.0)
    light = vehicle(locked=True)
    light.intrusion.shock_g = 0.2
    await r.set_vehicle(light)
    alert, = r.events_of("sentinel.alert")
    assert json.loads(alert.payload_json)["trigger"] == "shock"
    broken = vehicle(locked=True)
    broken.intrusion.shock_g = 0.2
    broken.intrusion.glass_break = True
    broken.intrusion.forced_doors.append(vehicle_pb2.DOOR_ID_FRONT_LEFT)
    await r.set_vehicle(broken)
    alarms = r.events_of("sentinel.alarm")
    assert sorted(json.loads(a.payload_json)["trigger"] for a in alarms) == ["forced_door", "glass_break"]
    assert "front left door" in " ".join(json.loads(a.payload_json)["reason"] for a in alarms)
    kinds = [row["kind"] for row in r.db.connect().execute("SELECT kind FROM actions WHERE cause_cursor=?",
                                                           (alarms[0].cursor,))]
    assert sorted(kinds) == ["headlight_flash", "horn", "owner_notification"]
    await r.set_vehicle(broken)                                        # the same snapshot again: nothing new
    assert len(r.events_of("sentinel.alarm")) == 2
    for field, value in (("shock_g", float("nan")), ("shock_g", -1.0), ("tilt_deg", 400.0)):
        bad = vehicle(locked=True)
        setattr(bad.intrusion, field, value)
        with pytest.raises(ValueError, match=f"intrusion.{field}"):
            validate_state(bad)
    bad = vehicle(locked=True)
    bad.intrusion.forced_doors.append(99)
    with pytest.raises(ValueError, match="intrusion.forced_doors"):
        validate_state(bad)


async def test_false_positive_raises_that_zones_thresholds_and_survives_restart(harness, clock):
    harness.restore_vehicle = True
    short_clips(harness)
    r = await harness.start()
    sentinel = r.stub("Sentinel")
    await r.set_vehicle(vehicle(locked=True))
    await play(r, clock, 6.0, [(3.0, 0.0)])
    alert, = r.events_of("sentinel.alert")
    await play(r, clock, 3.0)
    clip_id = json.loads(alert.payload_json)["clip_id"]
    reply = await sentinel.LabelFalsePositive(skills_pb2.LabelFalsePositiveRequest(clip_id=clip_id, note="a neighbour"))
    assert reply.zone.zone == "left" and reply.zone.false_positives == 1
    assert reply.zone.linger_seconds == pytest.approx(6.25) and reply.zone.near_distance_m < 4.0
    again = await sentinel.LabelFalsePositive(skills_pb2.LabelFalsePositiveRequest(clip_id=clip_id))
    assert again.zone.false_positives == 1                              # one clip counts once
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sentinel.LabelFalsePositive(skills_pb2.LabelFalsePositiveRequest(clip_id="clip-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    r = await harness.restart()
    assert [z.zone for z in (await status(r)).zones] == ["left"]
    clock.advance(60)
    await r.host.tick()
    await play(r, clock, 6.0, [(3.0, 0.0)])                             # 6 s: now under the left zone's 6.25 s
    assert len(r.events_of("sentinel.alert")) == 1
    await play(r, clock, 3.0)
    await play(r, clock, 6.0, (), right=[(3.0, 0.0)])                   # the right zone is as sensitive as before
    assert len(r.events_of("sentinel.alert")) == 2


async def test_restarts_keep_arming_intent_without_new_armed_events(harness, clock):
    harness.restore_vehicle = True
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    assert (await status(r)).armed and len(r.events_of("sentinel.armed")) == 1
    r = await harness.restart()                         # armed automatically: comes back armed, says nothing
    await r.set_vehicle(vehicle(locked=True))
    assert (await status(r)).armed and len(r.events_of("sentinel.armed")) == 1
    await r.stub("Sentinel").Disarm(skills_pb2.DisarmRequest())
    r = await harness.restart()                         # the owner's Disarm while locked holds
    await r.set_vehicle(vehicle(locked=True))
    st = await status(r)
    assert not st.armed and st.request == "disarmed" and len(r.events_of("sentinel.armed")) == 1
    await r.set_vehicle(vehicle(locked=False))          # the owner is back: the request ends
    await r.stub("Sentinel").Arm(skills_pb2.ArmRequest())
    armed_events = len(r.events_of("sentinel.armed"))
    r = await harness.restart()                         # armed by request (unlocked): still armed
    st = await status(r)
    assert st.armed and st.request == "armed" and st.reason == "armed by request"
    assert len(r.events_of("sentinel.armed")) == armed_events


async def test_arming_rules_and_wrong_vehicle_state(harness, clock):
    harness.config.sentinel.saved_places = [SavedPlace("home", 48.137154, 11.576124)]
    r = await harness.start()
    sentinel = r.stub("Sentinel")
    await r.set_vehicle(vehicle(locked=True, gps=(48.137199, 11.576124)))     # 5 m from home: not armed
    st = await status(r)
    assert not st.armed and "home" in st.reason
    await r.set_vehicle(vehicle(locked=True, gps=(48.137289, 11.576124)))     # 15 m away: armed
    assert (await status(r)).armed
    await r.set_vehicle(vehicle(locked=True, battery=15.0, gps=(48.137289, 11.576124)))
    st = await status(r)
    assert not st.armed and "battery" in st.reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sentinel.Arm(skills_pb2.ArmRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=40.0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sentinel.Arm(skills_pb2.ArmRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "driving" in err.value.details()
    await r.set_vehicle(vehicle())
    assert (await sentinel.Arm(skills_pb2.ArmRequest())).state == skills_pb2.SENTINEL_STATE_STANDBY
    assert (await sentinel.Disarm(skills_pb2.DisarmRequest())).state == skills_pb2.SENTINEL_STATE_DISARMED
    await r.set_vehicle(vehicle(locked=True))
    assert not (await status(r)).armed


async def test_glitch_masks_and_body_box_fallback_without_pose(harness, clock):
    short_clips(harness)
    harness.config.sentinel.masks = {"left": [[0.0, 0.0, 0.3, 1.0]]}   # e.g. a pavement with passers-by
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    at_rear_handle = (1.5, 0.4)                       # box centre at x ~ 0.67 of the frame: the rear handle
    for _ in range(3):                                # at the handle on one frame only, between empty frames
        await play(r, clock, 0.1, [at_rear_handle])
        await play(r, clock, 0.3)
    await play(r, clock, 8.0, [(1.5, -0.8)])          # right at the car for 8 s, but inside the mask
    assert r.host.sentinel.state == skills_pb2.SENTINEL_STATE_STANDBY and not r.events_of("sentinel.al")
    await play(r, clock, 0.3, [at_rear_handle])       # confirmed on 3 frames, no pose stage: the body box
    alarm, = r.events_of("sentinel.alarm")
    assert "body box, no pose" in json.loads(alarm.payload_json)["reason"]
    box = person_box_at(*at_rear_handle)
    assert 0.60 * 640 < (box[0] + box[2]) / 2 < 0.75 * 640


async def test_retention_and_mp4_clips(harness, clock):
    short_clips(harness, 1.0, 1.0)
    harness.config.sentinel.clip_format = "mp4"
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    await play(r, clock, 1.0)
    await play(r, clock, 0.3, [(1.5, 0.4)])
    await play(r, clock, 1.5)
    first, = r.host.sentinel.list_clips()
    assert first.complete and first.format == "mp4"
    chunks = [c async for c in r.stub("Sentinel").GetClip(skills_pb2.GetClipRequest(clip_id=first.clip_id,
                                                                                  camera_id=LEFT))]
    path = harness.tmp_path / "replayed.mp4"
    path.write_bytes(b"".join(c.data for c in chunks))
    video, decoded = cv2.VideoCapture(str(path)), 0
    while video.read()[0]:
        decoded += 1
    video.release()
    assert decoded == next(c.frame_count for c in first.cameras if c.camera_id == LEFT)

    harness.config.sentinel.clip_max_total_bytes = first.size_bytes + 1
    clock.advance(60)
    await r.host.tick()
    await play(r, clock, 0.3, [(1.5, 0.4)])
    await play(r, clock, 1.5)
    remaining = r.host.sentinel.list_clips()
    assert len(remaining) == 1 and remaining[0].clip_id != first.clip_id    # the newest is kept, the oldest gone
    assert not (r.host.sentinel.clip_dir / first.clip_id).exists()
    clock.advance(harness.config.sentinel.clip_max_age_seconds + 1)
    assert r.host.sentinel.enforce_retention() == [remaining[0].clip_id]
    assert not any(r.host.sentinel.clip_dir.iterdir())


async def test_a_door_opening_while_the_car_stays_locked_is_a_forced_door(harness, clock):
    short_clips(harness)
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    await r.set_vehicle(vehicle(locked=True, doors=[(vehicle_pb2.DOOR_ID_REAR_RIGHT, True, False)]))
    alarm, = r.events_of("sentinel.alarm")
    payload = json.loads(alarm.payload_json)
    assert payload["trigger"] == "forced_door" and "rear right door opened while locked" in payload["reason"]
    # Unlocked first (the owner with the key), a door opening is no intrusion.
    r = await harness.restart()
    await r.set_vehicle(vehicle(locked=False))
    await r.set_vehicle(vehicle(locked=False, doors=[(vehicle_pb2.DOOR_ID_FRONT_LEFT, True, False)]))
    assert len(r.events_of("sentinel.alarm")) == 1


async def test_an_alarm_never_waits_for_the_model_and_an_alerts_words_are_bounded(harness, clock):
    """A model stuck behind other work must not hold up the horn (an Alarm goes out with its facts at once) nor
    an Alert beyond `narration_timeout_s` (then its draft goes out, and the stuck generation is cancelled)."""
    import asyncio

    class StuckModel:
        calls, cancelled = 0, 0

        async def complete(self, prompt, **kwargs):
            StuckModel.calls += 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                StuckModel.cancelled += 1
                raise

    harness.narrator = StuckModel()
    harness.config.sentinel.narration_timeout_s = 0.3
    short_clips(harness)
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    light = vehicle(locked=True)
    light.intrusion.shock_g = 0.2
    await r.set_vehicle(light)
    alert, = r.events_of("sentinel.alert")
    assert StuckModel.calls == 1 and StuckModel.cancelled == 1          # asked, given up on, cancelled
    assert alert.message.startswith("Sentinel alert on the car's sensors: ") and "shock" in alert.message
    broken = vehicle(locked=True)
    broken.intrusion.glass_break = True
    await r.set_vehicle(broken)
    alarm, = r.events_of("sentinel.alarm")
    assert StuckModel.calls == 1                                         # the alarm never asked the model
    assert alarm.message.startswith("Sentinel alarm on the car's sensors: ") and "glass" in alarm.message
    kinds = [row["kind"] for row in r.db.connect().execute("SELECT kind FROM actions WHERE cause_cursor=?",
                                                           (alarm.cursor,))]
    assert sorted(kinds) == ["headlight_flash", "horn", "owner_notification"]
