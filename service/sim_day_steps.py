"""The steps of the scripted day, in order; each drives the service and checks what its skill did."""
from __future__ import annotations

import json

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service import sim_scenes as scenes
from service.sim_day import BAY, DRIVER, FOB, LEVEL, Day, Outcome

PARKED = dict(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF)
PREFERENCES = json.dumps({"seat": "position 3", "mirrors": "memory 1", "climate_c": 21})


def _door(door: int, open_: bool = True) -> vehicle_pb2.DoorState:
    return vehicle_pb2.DoorState(door=door, open=open_)


async def enrol_driver(day: Day) -> Outcome:
    for profile in (await day.skills("Greeter").ListProfiles(skills_pb2.ListProfilesRequest())).profiles:
        if profile.name == DRIVER:       # a kept data dir: enrol afresh so the day starts the same way
            await day.skills("Greeter").DeleteProfile(skills_pb2.DeleteProfileRequest(profile_id=profile.profile_id))
    since = day.mark()
    profile = await day.skills("Greeter").Enroll(skills_pb2.EnrollRequest(
        name=DRIVER, consent=True, key_fob_id=FOB, preferences_json=PREFERENCES,
        image=common_pb2.Image(encoding=common_pb2.IMAGE_ENCODING_JPEG,
                               data=scenes.driver_portrait_jpeg(day.images))))
    event = await day.wait_event("greeter.enrolled", since)
    if not profile.face or event is None:
        return Outcome(False, f"profile {profile.profile_id}: face={profile.face}, greeter.enrolled "
                              f"{'seen' if event else 'not seen'}")
    return Outcome(True, f"{DRIVER} enrolled as {profile.profile_id} (face template encrypted, fob {FOB})")


async def greet_driver(day: Day) -> Outcome:
    await day.vehicle(**PARKED, locked=True)
    since = day.mark()
    day.show("left", scenes.driver_walks_up(day.images))        # the driver's side camera (not the cabin:
    # The face first (the side camera sees the driver walking up), the fob's signal a few seconds later.
    greeting = await day.wait_event("greeter.greeting", since, timeout=15)
    await day.vehicle(**PARKED, locked=True, fob=FOB)
    greeting = greeting or await day.wait_event("greeter.greeting", since)
    applied = greeting and await day.wait_event("greeter.profile_apply", since, timeout=5)
    day.show("left", scenes.empty(day.images))                  # someone seen in a locked cabin is Safety's)
    if greeting is None:
        return Outcome(False, f"no greeter.greeting within {day.step_timeout:.0f} s ({day.kinds_since(since)})")
    method = json.loads(greeting.payload_json or "{}").get("method", "?")
    seat_action = any(a.startswith("seat_mirror_profile") for a in day.actions)
    if applied is None:
        return Outcome(False, f"greeted ({method}: {greeting.message!r}) but no greeter.profile_apply")
    if "face" not in method:           # the walk-up is about the face: the fob alone is only the fallback
        return Outcome(False, f"greeted and profile applied by {method} only: the driver's face on the left camera "
                              f"was not recognised within 15 s ({greeting.message!r})")
    return Outcome(True, f"greeted by {method}: {greeting.message!r}; profile applied"
                         f"{' (gateway: seat_mirror_profile)' if seat_action else ''}")


async def park_by_sign(day: Day) -> Outcome:
    await day.vehicle(gear=vehicle_pb2.GEAR_DRIVE, ignition=vehicle_pb2.IGNITION_ON, speed_kmh=6, fob=FOB)
    day.show("front", scenes.garage_with_sign(day.images, LEVEL, BAY))
    await _sleep(day, 3.0)                     # a few frames of the sign while rolling in
    since = day.mark()
    await day.vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON, fob=FOB)
    await _sleep(day, 1.0)
    await day.vehicle(**PARKED, fob=FOB)
    parked = await day.wait_event("car_finder.parked", since)
    if parked is None:
        return Outcome(False, f"no car_finder.parked ({day.kinds_since(since)})")
    done = await day.ask("Where is my car?")
    answer = done.answer.strip() if done else ""
    ok = done is not None and done.handled_by == "car_finder" and LEVEL in answer and BAY in answer
    payload = json.loads(parked.payload_json or "{}")
    return Outcome(ok, f"parked record level={payload.get('level')!r} bay={payload.get('bay')!r}; "
                       f"\"Where is my car?\" -> {answer!r} [{done.handled_by if done else 'no answer'}]")


async def sentinel_lingerer(day: Day) -> Outcome:
    day.show("front", scenes.empty(day.images))
    since = day.mark()
    await day.vehicle(**PARKED, locked=True)               # the driver walked away with the fob
    armed = await day.wait_event("sentinel.armed", since, timeout=10)
    if armed is None:
        return Outcome(False, f"Sentinel did not arm on locking ({day.kinds_since(since)})")
    since = day.mark()
    day.show("front", scenes.person_lingering(day.images))
    alert = await day.wait_event("sentinel.alert", since)
    day.show("front", scenes.empty(day.images))
    if alert is None:
        return Outcome(False, f"armed, but no sentinel.alert for a person lingering ({day.kinds_since(since)})")
    payload = json.loads(alert.payload_json or "{}")
    clip = payload.get("clip_id", "")
    saved = clip and await day.wait_event("sentinel.clip_saved", since, timeout=day.step_timeout + 15,
                                          where=lambda e, p: p.get("clip_id") == clip)
    if not saved:
        return Outcome(False, f"alert ({payload.get('trigger')}) but clip {clip or '(none)'} was not saved")
    return Outcome(True, f"alert, trigger {payload.get('trigger')}: {alert.message!r}; clip {clip} saved "
                         f"(download: incar sentinel clip {clip} --out DIR)")


async def child_left_behind(day: Day) -> Outcome:
    await day.vehicle(**PARKED, fob=FOB)                    # back at the car: unlocking disarms Sentinel
    await day.skills("Sentinel").Disarm(skills_pb2.DisarmRequest())
    day.show("cabin_rear", scenes.child_in_back(day.images))
    await _sleep(day, 2.0)
    first_action = len(day.actions)
    since = day.mark()
    await day.vehicle(**PARKED, locked=True)                # locked with the child still in the back
    first = await day.wait_event("safety.child_left_behind", since)
    if first is None:
        day.show("cabin_rear", scenes.empty(day.images))
        return Outcome(False, f"no safety.child_left_behind ({day.kinds_since(since)})")
    second = await day.wait_event("safety.child_left_behind", since, timeout=day.step_timeout + 15,
                                  where=lambda e, p: p.get("escalation_level", 0) >= 2)
    await day.skills("Safety").Acknowledge(skills_pb2.AcknowledgeRequest(
        event_cursor=json.loads(first.payload_json or "{}").get("alert_cursor") or first.cursor))
    resolved = await day.wait_event("safety.child_left_behind_resolved", since, timeout=10)
    day.show("cabin_rear", scenes.empty(day.images))
    actions = day.actions[first_action:]
    levels = [json.loads(e.payload_json or "{}").get("actions") for e in (first, second) if e]
    ok = second is not None and resolved is not None
    return Outcome(ok, f"level 1 {levels[0]}, level 2 {levels[1] if second else 'not reached'}; gateway performed "
                       f"{', '.join(actions) or 'nothing'}; acknowledged: "
                       f"{'resolved' if resolved else 'not resolved'}")


async def safe_exit(day: Day) -> Outcome:
    await day.vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON, fob=FOB)
    day.show("left", scenes.cyclist_approaching(day.images))
    since = day.mark()
    await day.vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON, fob=FOB,
                      doors=[_door(vehicle_pb2.DOOR_ID_REAR_LEFT)])
    warning = await day.wait_event("safety.safe_exit_warning", since)
    day.show("left", scenes.empty(day.images))
    await day.vehicle(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_ON, fob=FOB)
    if warning is None:
        return Outcome(False, f"no safety.safe_exit_warning for the cyclist ({day.kinds_since(since)})")
    p = json.loads(warning.payload_json or "{}")
    return Outcome(True, f"{warning.message!r}: side {p.get('side')}, {p.get('object')}, decided in "
                         f"{float(p.get('decision_s') or 0) * 1000:.1f} ms (budget {p.get('budget_s')} s)")


async def camera_questions(day: Day) -> Outcome:
    day.show("front", scenes.garage_with_sign(day.images, LEVEL, BAY))
    await _sleep(day, 1.0)
    lines, ok = [], True
    for question, cameras in (("What do you see on the front camera?", ["front"]),
                              ("Is anyone on the left side of the car?", ["left"])):
        done = await day.ask(question, cameras, route=False)
        if done is None or not done.answer.strip():
            ok = False
            lines.append(f"{question!r}: no answer")
            continue
        t = done.timings
        lines.append(f"{question!r} -> {done.answer.strip()!r} [{done.handled_by}; TTFT "
                     f"{t.time_to_first_token_s * 1000:.0f} ms, {t.tokens_per_second:.0f} tok/s, "
                     f"{t.end_to_end_s:.1f} s]")
        ok = ok and t.time_to_first_token_s > 0
    return Outcome(ok, "; ".join(lines))


async def _sleep(day: Day, seconds: float) -> None:
    import asyncio
    try:
        await asyncio.wait_for(day.stop.wait(), seconds)
    except TimeoutError:
        pass


STEPS = {
    "enrol": ("Greeter", "the driver is enrolled from a photo, with a key fob and seat/mirror presets", enrol_driver),
    "greet": ("Greeter", "the driver walks up to the locked car with the fob; greeted, profile applied",
              greet_driver),
    "park": ("Car Finder", f"the car parks beside a LEVEL {LEVEL} / BAY {BAY} sign; \"Where is my car?\"",
             park_by_sign),
    "sentinel": ("Sentinel", "locked and left; a stranger lingers by the front of the car", sentinel_lingerer),
    "child": ("Safety", "a child is left in the back of the locked car; escalation, then acknowledged",
              child_left_behind),
    "exit": ("Safety", "a cyclist comes up on the left as the rear-left door opens", safe_exit),
    "ask": ("Assistant", "questions about the cameras, answered with timings", camera_questions),
}


def chosen_steps(spec: str):
    """The steps named in a comma-separated list, in its order."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise SystemExit(f"incar sim: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    return [(name, *STEPS[name]) for name in names]
