"""Sentinel over gRPC: Standby -> Alert -> Alarm with a clip that starts before the event; arming rules;
multi-frame confirmation and masks; clips survive a restart."""
from __future__ import annotations

import json

import cv2
import grpc
import numpy as np
import pytest

from incar.v1 import skills_pb2, vehicle_pb2
from skills.config import SavedPlace
from tests.skills.conftest import vehicle
from tests.skills.scenes import analysis, background, person_box, person_frame

FPS = 10
CAM = "ext-left"


def ext(t, frame, detections=()):
    return analysis(CAM, "exterior", "left", t, frame, detections)


async def play(r, clock, seconds: float, box=None, seed=0):
    """`seconds` of frames at FPS; the person at `box` (or nobody)."""
    for i in range(int(round(seconds * FPS))):
        t = clock.advance(1 / FPS)
        if box is None:
            await r.frame(ext(t, background(seed=seed + i)))
        else:
            frame, det = person_frame(box, seed=seed + i)
            await r.frame(ext(t, frame, [det]))


async def test_standby_alert_alarm_clip_with_pre_event_frames_and_restart(harness, clock):
    r = await harness.start()
    sentinel = r.stub("Sentinel")
    status = await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())
    assert status.state == skills_pb2.SENTINEL_STATE_DISARMED and not status.armed

    await r.set_vehicle(vehicle(locked=True))
    status = await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())
    assert status.state == skills_pb2.SENTINEL_STATE_STANDBY and status.armed, status.reason

    await play(r, clock, 2.0)                                       # empty street: pre-event footage
    await play(r, clock, 1.0, person_box(0.25, centre_x=80))        # far away: nothing
    assert (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).state == skills_pb2.SENTINEL_STATE_STANDBY
    await play(r, clock, 4.0, person_box(0.5, centre_x=80))         # near, but not yet long enough
    assert (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).state == skills_pb2.SENTINEL_STATE_STANDBY
    await play(r, clock, 2.0, person_box(0.5, centre_x=80))         # lingering > 5 s -> Alert
    await r.host.sentinel.drain()
    assert (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).state == skills_pb2.SENTINEL_STATE_ALERT
    await play(r, clock, 0.5, person_box(0.6, centre_x=240))        # at the front door handle -> Alarm
    await r.host.sentinel.drain()
    assert (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).state == skills_pb2.SENTINEL_STATE_ALARM

    alert, = r.events_of("sentinel.alert")
    alarm, = r.events_of("sentinel.alarm")
    assert alert.cursor < alarm.cursor and alarm.severity > alert.severity
    assert "lingering" in json.loads(alert.payload_json)["reason"]
    assert "door handle" in json.loads(alarm.payload_json)["reason"]
    assert alert.message and alarm.message                          # the description (worded by the narrator)

    clips = (await sentinel.ListClips(skills_pb2.ListClipsRequest())).clips
    assert len(clips) == 2
    by_cursor = {c.event_cursor: c for c in clips}
    alert_clip = by_cursor[alert.cursor]
    assert list(alert.attachment_ids)[0] == alert_clip.clip_id
    payload = json.loads(alert.payload_json)
    assert payload["frames_before_event"] >= 4 * FPS                # ~5 s of history before the event
    assert alert_clip.event_time.ToNanoseconds() - alert_clip.start_time.ToNanoseconds() >= 4.5e9
    assert alert_clip.format == "jpeg-sequence" and alert_clip.frame_count == payload["frames_before_event"] + 1

    chunks = [c async for c in sentinel.GetClip(skills_pb2.GetClipRequest(clip_id=alert_clip.clip_id))]
    jpegs = [c for c in chunks if c.name.endswith(".jpg")]
    assert len(jpegs) == alert_clip.frame_count
    index = json.loads(b"".join(c.data for c in chunks if c.name == "index.json"))
    assert index[0]["capture_time"] < alert_clip.event_time.ToSeconds() - 4.5
    first = cv2.imdecode(np.frombuffer(jpegs[0].data, np.uint8), cv2.IMREAD_COLOR)
    assert first.shape == (480, 640, 3)
    assert alert_clip.size_bytes == sum(len(c.data) for c in chunks)

    # The person leaves: after the cool-down, back to Standby.
    await play(r, clock, 1.0)
    clock.advance(harness.config.sentinel.cooldown_seconds)
    await r.host.tick()
    assert (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).state == skills_pb2.SENTINEL_STATE_STANDBY
    assert r.events_of("sentinel.standby")

    await sentinel.LabelFalsePositive(skills_pb2.LabelFalsePositiveRequest(clip_id=alert_clip.clip_id, note="the postman"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sentinel.LabelFalsePositive(skills_pb2.LabelFalsePositiveRequest(clip_id="clip-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Nothing stored is lost across a restart.
    r = await harness.restart()
    sentinel = r.stub("Sentinel")
    after = {c.clip_id: c for c in (await sentinel.ListClips(skills_pb2.ListClipsRequest())).clips}
    assert set(after) == {c.clip_id for c in clips}
    assert after[alert_clip.clip_id].false_positive
    again = [c async for c in sentinel.GetClip(skills_pb2.GetClipRequest(clip_id=alert_clip.clip_id))]
    assert b"".join(c.data for c in again) == b"".join(c.data for c in chunks)
    assert [e.kind for e in r.events.after(0, 1000, ["sentinel.al"])] == ["sentinel.alert", "sentinel.alarm"]


async def test_arming_rules_and_wrong_vehicle_state(harness, clock):
    harness.config.sentinel.saved_places = [SavedPlace("home", 48.137154, 11.576124)]
    r = await harness.start()
    sentinel = r.stub("Sentinel")
    # 5 m from home (0.000045 deg latitude ~ 5 m): not armed.
    await r.set_vehicle(vehicle(locked=True, gps=(48.137199, 11.576124)))
    status = await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())
    assert not status.armed and "home" in status.reason
    # 15 m away: armed.
    await r.set_vehicle(vehicle(locked=True, gps=(48.137289, 11.576124)))
    assert (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).armed
    # Battery below the floor: off, and a manual arm is refused.
    await r.set_vehicle(vehicle(locked=True, battery=15.0, gps=(48.137289, 11.576124)))
    status = await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())
    assert not status.armed and "battery" in status.reason
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sentinel.Arm(skills_pb2.ArmRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Driving: arming is a wrong-state request.
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=40.0))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sentinel.Arm(skills_pb2.ArmRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "driving" in err.value.details()
    # Parked, unlocked: manual arm works; disarm holds until the next unlock.
    await r.set_vehicle(vehicle())
    assert (await sentinel.Arm(skills_pb2.ArmRequest())).state == skills_pb2.SENTINEL_STATE_STANDBY
    status = await sentinel.Disarm(skills_pb2.DisarmRequest())
    assert status.state == skills_pb2.SENTINEL_STATE_DISARMED
    await r.set_vehicle(vehicle(locked=True))
    assert not (await sentinel.GetStatus(skills_pb2.SentinelStatusRequest())).armed


async def test_single_frame_glitch_and_masked_region_do_not_alarm(harness, clock):
    harness.config.sentinel.masks = {"left": [[0.0, 0.0, 0.5, 1.0]]}   # e.g. a pavement with passers-by
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    for _ in range(3):   # the handle zone person on one frame only, between empty frames
        await play(r, clock, 0.1, person_box(0.6, centre_x=432))
        await play(r, clock, 0.3)
    await play(r, clock, 1.0, person_box(0.6, centre_x=240))      # at a handle, but inside the mask
    await play(r, clock, 8.0, person_box(0.9, centre_x=120))      # touching, inside the mask
    await r.host.sentinel.drain()
    assert r.host.sentinel.state == skills_pb2.SENTINEL_STATE_STANDBY
    assert not r.events_of("sentinel.al")
    await play(r, clock, 0.3, person_box(0.6, centre_x=432))      # the rear handle, confirmed on 3 frames
    await r.host.sentinel.drain()
    assert r.host.sentinel.state == skills_pb2.SENTINEL_STATE_ALARM


async def test_retention_drops_oldest_clips_beyond_size(harness, clock):
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    await play(r, clock, 0.3, person_box(0.6, centre_x=240))
    await r.host.sentinel.drain()
    first, = r.host.sentinel.list_clips()
    harness.config.sentinel.clip_max_total_bytes = first.size_bytes + 1
    clock.advance(60)
    await r.host.tick()
    await play(r, clock, 0.3)
    await play(r, clock, 0.3, person_box(0.6, centre_x=240))
    await r.host.sentinel.drain()
    remaining = r.host.sentinel.list_clips()
    assert len(remaining) == 1 and remaining[0].clip_id != first.clip_id    # the newest is kept, the oldest gone
    assert not (r.host.sentinel.clip_dir / first.clip_id).exists()
    assert (r.host.sentinel.clip_dir / remaining[0].clip_id).exists()
    # Age limit: a month later even the newest goes.
    clock.advance(harness.config.sentinel.clip_max_age_seconds + 1)
    assert r.host.sentinel.enforce_retention() == [remaining[0].clip_id]
    assert not any(r.host.sentinel.clip_dir.iterdir()) and not any(r.host.sentinel.snapshot_dir.iterdir())


async def test_window_motion_alarm_as_mp4_clip(harness, clock):
    from service.perception.types import Motion
    harness.config.sentinel.clip_format = "mp4"
    r = await harness.start()
    await r.set_vehicle(vehicle(locked=True))
    await play(r, clock, 1.0)
    window = (200.0, 40.0, 420.0, 150.0)              # inside the left camera's window zone
    for i in range(harness.config.sentinel.confirm_frames):
        frame, det = person_frame(person_box(0.3, centre_x=560), seed=i)   # someone there, not near
        motion = Motion(fraction=0.05, regions=(window,))
        await r.frame(analysis(CAM, "exterior", "left", clock.advance(0.1), frame, [det], motion=motion))
    await r.host.sentinel.drain()
    alarm, = r.events_of("sentinel.alarm")
    assert "window" in json.loads(alarm.payload_json)["reason"]
    clip, = r.host.sentinel.list_clips()
    assert clip.format == "mp4" and clip.frame_count == 10 + harness.config.sentinel.confirm_frames
    chunks = [c async for c in r.stub("Sentinel").GetClip(skills_pb2.GetClipRequest(clip_id=clip.clip_id))]
    path = harness.tmp_path / "replayed.mp4"
    path.write_bytes(b"".join(c.data for c in chunks))
    video = cv2.VideoCapture(str(path))
    decoded = 0
    while video.read()[0]:
        decoded += 1
    video.release()
    assert decoded == clip.frame_count
