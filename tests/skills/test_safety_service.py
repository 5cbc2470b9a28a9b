"""Child presence through the whole service (`incar serve` in a subprocess, real gRPC, real detectors): a still
cabin photo of three adults streamed at 5 fps after locking raises the alert within 10 s of frames, each
occupant estimated an adult; a kill -9 mid-escalation comes back at the same level, Acknowledge still knows the
alert, and the next owner notification comes on the original timeline."""
from __future__ import annotations

import json
import signal
import threading
import time

import cv2
import grpc
import pytest

from incar.v1 import (cameras_pb2, cameras_pb2_grpc, common_pb2, events_pb2, events_pb2_grpc, skills_pb2,
                      skills_pb2_grpc, vehicle_pb2, vehicle_pb2_grpc)
from tests.conftest import PHOTOS

FPS = 5
REPEAT_S = 15.0
NOTIFY_AT_S = 3.0
CONFIG = f"""
runtime:
  bundle: /nonexistent-bundle          # the language model is not needed here; the Assistant says so
skills:
  safety:
    notification_repeat_seconds: {REPEAT_S}
    escalation:
      - {{after_seconds: 0, actions: []}}
      - {{after_seconds: {NOTIFY_AT_S}, actions: [owner_notification]}}
      - {{after_seconds: 600, actions: [horn, hazard_lights]}}
"""


@pytest.fixture
def server(server_process, tmp_path):
    from service.perception.build import build
    build(quantize=False, progress=lambda line: None)   # the CPU runs the float graphs
    path = tmp_path / "incar.yaml"
    path.write_text(CONFIG)
    return server_process(["--config", str(path)]).start()


def cabin_jpeg() -> bytes:
    image = cv2.resize(cv2.imread(str(PHOTOS / "faces1.jpg")), (960, 640), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def lock(channel) -> None:
    state = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True,
                                     battery_percent=80)
    for seat in (vehicle_pb2.SEAT_ID_DRIVER, vehicle_pb2.SEAT_ID_REAR_LEFT):
        state.seats.add(seat=seat, occupancy=vehicle_pb2.OCCUPANCY_EMPTY)
    vehicle_pb2_grpc.VehicleStub(channel).UpdateState(state, timeout=20)


def safety_events(channel, kind="safety.child_left_behind"):
    return list(events_pb2_grpc.EventsStub(channel).ListEvents(
        events_pb2.ListEventsRequest(kinds=[kind], limit=1000), timeout=10).events)


def stream_until_alert(channel, max_frames: int) -> int:
    """Send the same cabin photo at 5 fps until the alert is there; returns the frames sent."""
    data, sent, done = cabin_jpeg(), [0], threading.Event()

    def frames():
        while not done.is_set() and sent[0] < max_frames:
            frame = cameras_pb2.Frame(camera_id="cabin-rear", role=common_pb2.CAMERA_ROLE_CABIN,
                                      position=common_pb2.MOUNT_POSITION_CABIN_REAR, sequence=sent[0] + 1,
                                      image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG, data=data))
            frame.capture_time.GetCurrentTime()
            sent[0] += 1
            yield frame
            time.sleep(1 / FPS)
            if safety_events(channel):
                done.set()

    for _ in cameras_pb2_grpc.CamerasStub(channel).StreamFrames(frames(), timeout=120):
        pass
    return sent[0]


def payload(event) -> dict:
    return json.loads(event.payload_json)


def test_a_still_cabin_photo_after_locking_raises_the_alert_within_ten_seconds(server):
    with grpc.insecure_channel(server.target) as ch:
        lock(ch)
        sent = stream_until_alert(ch, max_frames=10 * FPS)
        alerts = safety_events(ch)
        assert alerts, f"no child presence alert after {sent} frames ({sent / FPS:.0f} s of a still photo)"
        first = payload(alerts[0])
        people = [o for o in first["occupants"] if o["kind"] == "person"]
        assert len(people) >= 2 and {o["estimate"] for o in people} <= {"adult"}, first["occupants"]
        assert {"face", "person"} & set(people[0]["cues"])
        skills_pb2_grpc.SafetyStub(ch).Acknowledge(skills_pb2.AcknowledgeRequest(event_cursor=alerts[0].cursor))


def test_kill_9_mid_escalation_resumes_at_the_same_level_and_the_next_notification_is_on_time(server):
    with grpc.insecure_channel(server.target) as ch:
        lock(ch)
        stream_until_alert(ch, max_frames=20 * FPS)
        deadline = time.monotonic() + 30
        while not any(payload(e)["escalation_level"] == 2 for e in safety_events(ch)):
            assert time.monotonic() < deadline, "the owner notification (level 2) never came"
            time.sleep(0.2)
        time.sleep(0.5)
        before = safety_events(ch)
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(20) == -signal.SIGKILL
    server.start()
    with grpc.insecure_channel(server.target) as ch:
        active, = skills_pb2_grpc.SafetyStub(ch).GetStatus(skills_pb2.SafetyStatusRequest(), timeout=10).active
        assert active.escalation_level == 2 and active.event_cursor == before[0].cursor
        deadline = time.monotonic() + NOTIFY_AT_S + REPEAT_S + 30
        while not any(payload(e).get("notification") == 2 for e in safety_events(ch)):
            assert time.monotonic() < deadline, "the next owner notification never came after the restart"
            time.sleep(0.2)
        after = safety_events(ch)
        again, = [e for e in after if payload(e).get("notification") == 2]
        late = payload(again)["seconds_since_detection"] - (NOTIFY_AT_S + REPEAT_S)
        assert 0 <= late < 3.0, f"the notification came {late:+.1f} s off its time"
        assert [payload(e)["escalation_level"] for e in after][:len(before)] == \
            [payload(e)["escalation_level"] for e in before]
        assert len(after) == len(before) + 1                      # nothing re-sent by the restart
        skills_pb2_grpc.SafetyStub(ch).Acknowledge(skills_pb2.AcknowledgeRequest(event_cursor=active.event_cursor))
        assert not skills_pb2_grpc.SafetyStub(ch).GetStatus(skills_pb2.SafetyStatusRequest(), timeout=10).active
