"""Safe exit over gRPC (Hyundai/Kia Safe Exit Assist): an approaching cyclist in that door's path is warned of
after one confirmation frame, with a door-lock hold on that side's doors that is lifted once it has passed;
box jitter on a parked car, a rider going away, a pedestrian, a moving car or a shut door stay quiet; the rear
camera covers both sides; a slow model answer does not delay the warning."""
from __future__ import annotations

import json

import numpy as np

from incar.v1 import actions_pb2, skills_pb2, vehicle_pb2
from service.perception.types import Detection
from skills.safety_exit import EXIT_WARNING_LATENCY, scale_rate
from tests.skills.conftest import vehicle
from tests.skills.scenes import BICYCLE_CROP, analysis, background, crop, paste

FRONT_LEFT, FRONT_RIGHT = vehicle_pb2.DOOR_ID_FRONT_LEFT, vehicle_pb2.DOOR_ID_FRONT_RIGHT
FPS = 15


def bicycle_frame(height: float, centre_x: float = 320, seed: int = 0):
    """The bicycle from dog.jpg pasted at `height` (share of the frame), bottom-anchored: closer = bigger."""
    frame = background(seed=seed)
    bw, bh = BICYCLE_CROP[2] - BICYCLE_CROP[0], BICYCLE_CROP[3] - BICYCLE_CROP[1]
    h = height * 480
    w = h * bw / bh
    box = paste(frame, crop("dog.jpg", BICYCLE_CROP), (centre_x - w / 2, 470 - h, centre_x + w / 2, 470))
    return frame, box


async def ride(r, clock, heights, position="left", label="bicycle", centre_x=320, boxes=None):
    """A rider on one camera at 15 fps; returns the frame index of each safe-exit warning."""
    warned = []
    for i, height in enumerate(heights):
        frame, box = bicycle_frame(height, centre_x, seed=i)
        box = boxes[i] if boxes is not None else box
        before = len(r.events_of("safety.safe_exit_warning"))
        await r.frame(analysis(f"ext-{position}", "exterior", position, clock.advance(1 / FPS), frame,
                               detections=[Detection(label, 0.8, box, track_id=7)]))
        if len(r.events_of("safety.safe_exit_warning")) > before:
            warned.append(i)
    return warned


APPROACH = [0.15 + 0.03 * i for i in range(12)]


def _histogram_count() -> float:
    for metric in EXIT_WARNING_LATENCY.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


def test_scale_rate_is_the_inverse_time_to_collision():
    # An object closing at 5 m/s from 20 m: size ~ 1/Z, so d ln(size)/dt = v/Z = 0.25/s at the last frame.
    boxes = [(t, (0, 0, 100 / (20 - 5 * t), 100 / (20 - 5 * t))) for t in np.arange(0, 0.5, 1 / FPS)]
    assert abs(scale_rate(boxes, 0.5, 4) - 5 / (20 - 5 * 0.23)) < 0.02
    assert scale_rate(boxes[:2], 0.5, 4) is None                      # too little history


async def test_an_approaching_cyclist_is_warned_of_and_the_hold_lifted_once_passed(harness, clock):
    r = await harness.start()
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, False, True)]))
    observed_before = _histogram_count()
    warned = await ride(r, clock, APPROACH)
    assert warned == [harness.config.safety.exit_min_frames]     # rate measurable, then one confirmation frame
    warning, = r.events_of("safety.safe_exit_warning")
    payload = json.loads(warning.payload_json)
    assert payload["side"] == "left" and payload["doors"] == ["front_left", "rear_left"]
    assert payload["object"] == "bicycle" and warning.severity == 3
    assert 0 < payload["ttc_s"] <= harness.config.safety.exit_ttc_seconds
    assert _histogram_count() == observed_before + 1
    assert payload["frame_age_s"] >= 0 and 0 <= payload["decision_s"] <= r.host.safety.last_exit_latency
    holds = r.db.connect().execute("SELECT door, state, cause_cursor FROM actions WHERE kind = 'door_lock_hold' "
                                   "ORDER BY door").fetchall()
    assert [(h["state"], h["cause_cursor"]) for h in holds] == [(actions_pb2.ACTION_STATE_PENDING, warning.cursor)] * 2
    assert {h["door"] for h in holds} == {vehicle_pb2.DOOR_ID_FRONT_LEFT, vehicle_pb2.DOOR_ID_REAR_LEFT}
    status = await r.stub("Safety").GetStatus(skills_pb2.SafetyStatusRequest())
    assert [a.kind for a in status.active] == ["safe_exit_warning"]
    # The cyclist has passed (out of view): the hold is lifted and the warning cleared.
    frame = background(seed=99)
    for _ in range(20):
        await r.frame(analysis("ext-left", "exterior", "left", clock.advance(1 / FPS), frame))
    await r.host.tick()
    assert r.events_of("safety.safe_exit_cleared")
    states = {row["state"] for row in r.db.connect().execute("SELECT state FROM actions WHERE kind='door_lock_hold'")}
    assert states == {actions_pb2.ACTION_STATE_CANCELLED}
    assert not (await r.stub("Safety").GetStatus(skills_pb2.SafetyStatusRequest())).active


async def test_wrong_states_and_harmless_objects_stay_quiet(harness, clock):
    r = await harness.start()
    await r.set_vehicle(vehicle())                                   # doors shut, nobody seated
    assert await ride(r, clock, APPROACH) == []
    await r.set_vehicle(vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed=10.0,
                                doors=[(FRONT_LEFT, False, True)]))   # rolling at 10 km/h: not an exit
    assert await ride(r, clock, APPROACH) == []
    await r.set_vehicle(vehicle(doors=[(FRONT_RIGHT, True, False)]))  # the other side's door
    assert await ride(r, clock, APPROACH) == []
    await r.set_vehicle(vehicle(doors=[(FRONT_LEFT, False, True)]))
    clock.advance(5)
    assert await ride(r, clock, list(reversed(APPROACH))) == []      # riding away
    clock.advance(5)
    assert await ride(r, clock, APPROACH, label="person") == []      # a pedestrian is not this warning's hazard
    clock.advance(5)
    # A parked car beside the door: its box jitters by 3 % of its size every frame, for 20 s.
    rng = np.random.default_rng(3)
    x1, y1, x2, y2 = 200.0, 200.0, 440.0, 400.0
    jittered = []
    for _ in range(20 * FPS):
        w, h = x2 - x1, y2 - y1
        jittered.append(tuple(v + rng.normal(0, 0.03) * s for v, s in zip((x1, y1, x2, y2), (w, h, w, h))))
    assert await ride(r, clock, [0.4] * len(jittered), label="car", boxes=jittered) == []
    assert not r.events_of("safety.safe_exit")


async def test_the_rear_camera_covers_both_sides_and_an_occupied_seat_arms_its_side(harness, clock):
    r = await harness.start()
    await r.set_vehicle(vehicle(seats=[(vehicle_pb2.SEAT_ID_REAR_RIGHT, vehicle_pb2.OCCUPANCY_OCCUPIED)]))
    assert r.host.safety.needs_camera("exterior", "rear") and not r.host.safety.needs_camera("cabin", "cabin_rear")
    assert await ride(r, clock, APPROACH, position="rear", centre_x=480) == []   # the car's left lane: not armed
    clock.advance(5)
    warned = await ride(r, clock, APPROACH, position="rear", centre_x=150)        # the right lane, image left
    assert warned
    assert json.loads(r.events_of("safety.safe_exit_warning")[0].payload_json)["side"] == "right"


async def test_a_slow_model_does_not_delay_a_safe_exit_warning(harness, clock):
    import asyncio

    class SlowModel:
        """A model busy for as long as the test says."""
        def __init__(self):
            self.release = asyncio.Event()

        async def complete(self, prompt, *, priority, **kwargs):
            await self.release.wait()
            return "Hello there, Bo."

    model = SlowModel()
    harness.narrator = model
    r = await harness.start()
    await r.stub("Greeter").Enroll(skills_pb2.EnrollRequest(name="Bo", consent=True, key_fob_id="fob-9"))
    # The owner walks up with the fob (a greeting is being worded) and pulls the handle as a cyclist comes.
    await r.set_vehicle(vehicle(key_fob_id="fob-9", doors=[(FRONT_LEFT, False, True)]), drain=False)
    for i, height in enumerate(APPROACH[:6]):
        frame, box = bicycle_frame(height, seed=i)
        await r.frame(analysis("ext-left", "exterior", "left", clock.advance(1 / FPS), frame,
                               detections=[Detection("bicycle", 0.8, box, track_id=1)]), drain=False)
    assert r.events_of("safety.safe_exit_warning") and not r.events_of("greeter.greeting")
    model.release.set()
    await r.host.drain()
    greeting, = r.events_of("greeter.greeting")
    assert (greeting.message == "Hello there, Bo."
            and greeting.cursor > r.events_of("safety.safe_exit_warning")[0].cursor)
