"""Tool results from the skills' own state: every fact the question needs, said in words and listed as facts.

The model may reword `text`, but the Assistant keeps its words only when they hold every fact and invent none;
otherwise it answers with `text` itself. So nothing here is left for the model to look up or guess.
"""
from __future__ import annotations

import time

from incar.v1 import common_pb2, skills_pb2
from service.runtime.tooling import ToolResult
from skills.base import InvalidRequestError, NotFoundError, PreconditionError, is_moving

SENTINEL_STATE = skills_pb2.SentinelState


def clock(epoch: float) -> str:
    return time.strftime("%H:%M", time.localtime(epoch))


def day_and_clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


# ------------------------------------------------------------------ car finder
async def where_is_my_car(car_finder) -> ToolResult:
    records = car_finder.history(1)
    if not records:
        return ToolResult("No parking position has been recorded yet.", ["No parking position"],
                          data={"recorded": False})
    r = records[0]
    when = day_and_clock(r.time.ToSeconds())
    spot = [f"level {r.level}" if r.level else "", f"row {r.row}" if r.row else "", f"bay {r.bay}" if r.bay else ""]
    spot = [s for s in spot if s]
    text = ("The car is parked on " + ", ".join(spot)) if spot else "No parking sign was read where the car is parked"
    facts = [v for v in (r.level, r.row, r.bay) if v]
    if r.gps_valid:
        gps = f"{r.gps.latitude_deg:.5f}, {r.gps.longitude_deg:.5f}"
        text += f", at GPS {gps}"
        facts.append(gps)
    else:
        text += " (no GPS fix there, likely a covered garage)"
    text += f", since {when}."
    facts.append(clock(r.time.ToSeconds()))
    return ToolResult(text, facts, data={"level": r.level, "row": r.row, "bay": r.bay, "gps_valid": r.gps_valid,
                                         "time": r.time.ToSeconds()})


# ------------------------------------------------------------------ sentinel
def _state_words(status: skills_pb2.SentinelStatus) -> str:
    return SENTINEL_STATE.Name(status.state).removeprefix("SENTINEL_STATE_").lower()


def sentinel_status(sentinel) -> ToolResult:
    s = sentinel.status()
    armed = "armed" if s.armed else "not armed"
    text = f"Sentinel is {armed} ({_state_words(s)}): {s.reason}, since {clock(s.since.ToSeconds())}."
    # "is armed" / "is not armed": a bare "armed" would also match words that say "not armed".
    return ToolResult(text, [f"is {armed}", s.reason],
                      data={"armed": s.armed, "state": _state_words(s), "reason": s.reason})


def sentinel_arm(sentinel) -> ToolResult:
    was = sentinel.status().armed
    s = sentinel.arm()
    if not s.armed:
        raise PreconditionError(f"Sentinel did not arm: {s.reason}")
    text = "Sentinel was already armed." if was else f"Done: I armed Sentinel ({s.reason})."
    return ToolResult(text, ["armed"], acted=not was, data={"armed": True, "reason": s.reason})


def sentinel_disarm(sentinel) -> ToolResult:
    was = sentinel.status().armed
    s = sentinel.disarm()
    text = f"Done: I disarmed Sentinel ({s.reason})." if was else "Sentinel was not armed; it stays off."
    return ToolResult(text, ["disarmed"] if was else ["not armed"], acted=was, data={"armed": s.armed})


def recent_clips(sentinel, limit: int = 3) -> ToolResult:
    clips = sentinel.list_clips(max(1, min(limit, 10)))
    if not clips:
        return ToolResult("Sentinel has recorded nothing.", ["nothing"], data={"clips": []})
    parts, facts = [], []
    for c in clips:
        when = clock(c.event_time.ToSeconds())
        parts.append(f"at {when} on the {c.camera_id} camera: {c.description or 'activity near the car'}")
        facts += [when, c.camera_id]
    count = "1 clip" if len(clips) == 1 else f"{len(clips)} clips"
    text = f"Sentinel recorded {count}: " + "; ".join(parts) + "."
    return ToolResult(text, facts, data={"clips": [c.clip_id for c in clips]})


# ------------------------------------------------------------------ greeter
def _cabin_frame(host):
    frames = host.ctx.frames
    if frames is None:
        raise PreconditionError("no camera source to enrol from")
    listing = getattr(frames, "camera_ids", None)    # the CameraHub lists its cameras and their roles
    for camera_id in (listing() if listing else []):
        if frames.camera_status(camera_id).role == common_pb2.CAMERA_ROLE_CABIN:
            frame = frames.latest(camera_id)
            if frame is None:
                raise PreconditionError(f"the cabin camera {camera_id!r} has no frame yet")
            return camera_id, frame.original
    raise PreconditionError("no cabin camera is configured to enrol from")


async def enrol(host, name: str) -> ToolResult:
    if not name.strip():
        raise InvalidRequestError("name: say the name to enrol, e.g. 'register my face as Anna'")
    camera_id, image = _cabin_frame(host)
    # Asking the car to register one's face is the consent; the answer says what was stored.
    profile = await host.greeter.enroll(name, True, image=image)
    text = f"Done: I enrolled {profile.name}'s face from the {camera_id} camera; only a face template is stored."
    return ToolResult(text, [profile.name], acted=True, data={"profile_id": profile.profile_id})


def forget(greeter, name: str) -> ToolResult:
    matches = [p for p in greeter.list_profiles() if p.name.lower() == name.strip().lower()]
    if not matches:
        raise NotFoundError(f"no driver profile named {name!r}")
    for p in matches:
        greeter.delete_profile(p.profile_id)
    text = f"Done: I deleted {matches[0].name}'s profile and face template."
    return ToolResult(text, [matches[0].name], acted=True, data={"deleted": [p.profile_id for p in matches]})


def who_is_here(greeter) -> ToolResult:
    names = [p.name for p in greeter.list_profiles()]
    if not names:
        return ToolResult("No driver profiles are enrolled.", ["no driver"], data={"profiles": []})
    count = "1 driver profile is" if len(names) == 1 else f"{len(names)} driver profiles are"
    return ToolResult(f"{count} enrolled: {', '.join(names)}.", names, data={"profiles": names})


# ------------------------------------------------------------------ safety
def _alert_words(a: skills_pb2.SafetyAlert) -> str:
    return f"{a.kind.replace('_', ' ')} (level {a.escalation_level}) since {clock(a.since.ToSeconds())}: {a.detail}"


def _alerts(alerts, none: str, fact_none: str) -> ToolResult:
    if not alerts:
        return ToolResult(none, [fact_none], data={"alerts": []})
    count = "1 active alert" if len(alerts) == 1 else f"{len(alerts)} active alerts"
    text = f"{count}: " + "; ".join(_alert_words(a) for a in alerts) + "."
    facts = [f for a in alerts for f in (a.kind.replace("_", " "), f"level {a.escalation_level}")]
    return ToolResult(text, facts, data={"alerts": [a.kind for a in alerts]})


def safety_status(safety) -> ToolResult:
    return _alerts(list(safety.status().active), "There are no active safety alerts.", "no active")


def safe_to_exit(safety) -> ToolResult:
    v = safety.vehicle
    if is_moving(v):
        return ToolResult(f"No: the car is moving at {v.speed_kmh:.0f} km/h.", ["moving"], data={"safe": False})
    warnings = [a for a in safety.status().active if a.kind == "safe_exit_warning"]
    if warnings:
        w = warnings[0]
        return ToolResult(f"Wait: {w.detail} (warning at {clock(w.since.ToSeconds())}).", ["Wait"],
                          data={"safe": False, "detail": w.detail})
    return ToolResult("No safe-exit warning is active: the exterior cameras see nothing approaching. "
                      "Still look before you open the door.", ["No safe-exit warning"], data={"safe": True})


def left_behind(safety) -> ToolResult:
    kinds = ("child_left_behind", "item_left_behind")
    alerts = [a for a in safety.status().active if a.kind in kinds]
    return _alerts(alerts, "Nothing left behind has been detected in the cabin.", "Nothing left behind")


# ------------------------------------------------------------------ vehicle actions
ACTION_WORDS = {"climate_on": "turn the climate on", "headlight_flash": "flash the headlights",
                "window_vent": "open the windows a little"}


def vehicle_action(actions, kind: str, reason: str, parameters: dict | None = None) -> ToolResult:
    if actions is None:
        raise PreconditionError("no vehicle gateway is connected for actions")
    action = actions.request(kind, reason=reason, priority="routine", parameters=parameters or {},
                             requested_by="assistant")
    words = ACTION_WORDS.get(kind, kind.replace("_", " "))
    extra = f" to {parameters['temperature_c']} °C" if parameters and "temperature_c" in parameters else ""
    text = f"Done: I asked the car to {words}{extra} (action {action.id})."
    return ToolResult(text, [words], acted=True, data={"action_id": action.id, "kind": kind})
