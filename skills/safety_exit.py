"""Safe exit: time to collision from a tracked box's scale change, in the door's path, above a speed floor.

For an object approaching the camera at closing speed v from distance Z, its image size s ~ 1/Z, so
d(ln s)/dt = v/Z and the time to collision is TTC = 1 / (d ln s / dt): no camera calibration needed. The rate
is a least-squares fit of ln(size) over the track's last `exit_window_seconds` (at least `exit_min_frames`
boxes, reaching back up to `exit_max_window_seconds` when the analysis rate is low), which smooths box jitter;
a parked car's jittering box has a rate near zero, below the speed floor.
A warning needs the condition on `exit_confirm_frames` consecutive frames of the same track (one confirmation),
the box inside the door path zone of a side whose exit is armed, a rate above the floor and TTC below the limit.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Histogram

from incar.v1 import common_pb2, vehicle_pb2
from service.perception.types import Detection, FrameAnalysis
from skills.base import centre, inside, to_pixels
from skills.safety_config import SafetyConfig
from skills.safety_state import ActiveAlert


@dataclass
class Track:
    boxes: deque = field(default_factory=lambda: deque(maxlen=64))   # (t, box)
    hits: int = 0                  # consecutive frames meeting the warning condition
    warned_side: str = ""          # the side warned of ("" when not warned)
    last_seen: float = 0.0
    last_rate: float = 0.0


@dataclass
class Approach:
    """A confirmed approach: the warning to give."""
    camera_id: str
    key: tuple
    side: str
    detection: Detection
    scale_rate: float              # 1/s
    ttc_s: float


def scale_rate(boxes, window_s: float, min_frames: int, max_window_s: float | None = None) -> float | None:
    """d ln(size) / dt by least squares over the last `window_s` seconds, or over the last `min_frames` boxes
    when fewer came in that time (a slower analysis rate) and they span at most `max_window_s`; None with too
    little history."""
    if not boxes:
        return None
    newest = boxes[-1][0]
    recent = [(t, b) for t, b in boxes if newest - t <= window_s + 1e-9]
    if len(recent) < min_frames and max_window_s is not None and len(boxes) >= min_frames \
            and newest - boxes[-min_frames][0] <= max_window_s + 1e-9:
        recent = list(boxes)[-min_frames:]
    if len(recent) < min_frames:
        return None
    pts = [(t, math.log(math.sqrt(max((b[2] - b[0]) * (b[3] - b[1]), 1e-6)))) for t, b in recent]
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    ms = sum(s for _, s in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var <= 0:
        return None
    return sum((t - mt) * (s - ms) for t, s in pts) / var


class ExitWatch:
    """Per-camera track histories and the warning decision (no I/O: the skill emits and acts)."""

    def __init__(self, cfg: SafetyConfig):
        self.cfg = cfg
        self.tracks: dict[tuple, Track] = {}

    def sides_in_view(self, analysis: FrameAnalysis, box) -> list[str]:
        zones = self.cfg.door_path_zones.get(analysis.position, {})
        c = centre(box)
        return [side for side, z in zones.items() if inside(c, to_pixels(tuple(z), analysis.frame))]

    def update(self, analysis: FrameAnalysis, armed_sides: set[str]) -> list[Approach]:
        """Feed one exterior frame; returns the approaches confirmed on this frame."""
        cfg, t = self.cfg, analysis.timestamp
        found: list[Approach] = []
        seen: set[tuple] = set()
        for det in analysis.detections:
            if det.label not in cfg.exit_hazard_labels or det.score < cfg.exit_min_score:
                continue
            key = (analysis.camera_id, det.track_id if det.track_id is not None else det.label)
            seen.add(key)
            track = self.tracks.setdefault(key, Track())
            if track.boxes and t <= track.boxes[-1][0]:
                continue   # an older or repeated frame: no new information
            track.boxes.append((t, det.box))
            track.last_seen = t
            rate = scale_rate(track.boxes, cfg.exit_window_seconds, cfg.exit_min_frames, cfg.exit_max_window_seconds)
            track.last_rate = rate or 0.0
            sides = [s for s in self.sides_in_view(analysis, det.box) if s in armed_sides]
            closing = rate is not None and rate >= cfg.exit_min_scale_rate and 1.0 / rate <= cfg.exit_ttc_seconds
            if not (sides and closing):
                track.hits = 0
                continue
            track.hits += 1
            if track.hits >= cfg.exit_confirm_frames and not track.warned_side:
                track.warned_side = sides[0]
                found.append(Approach(analysis.camera_id, key, sides[0], det, rate, 1.0 / rate))
        return found

    def passed(self, camera_id: str, now: float) -> list[tuple[tuple, str]]:
        """Warned tracks of this camera that are gone or receding: (key, side) whose hold can be lifted."""
        out = []
        for key, track in list(self.tracks.items()):
            if key[0] != camera_id:
                continue
            gone = now - track.last_seen >= self.cfg.exit_passed_seconds
            if track.warned_side and (gone or track.last_rate <= -self.cfg.exit_min_scale_rate):
                out.append((key, track.warned_side))
                track.warned_side = ""
                track.hits = 0
            if gone and not track.warned_side:
                del self.tracks[key]
        return out


# ---------------------------------------------------------------------- the skill's half: events and door holds
EXIT_WARNING_LATENCY = Histogram(
    "incar_safety_exit_warning_latency_seconds", "Safe-exit warning: frame capture to committed warning",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0))

SIDE_DOORS = {"left": ("front_left", "rear_left"), "right": ("front_right", "rear_right")}
_DOOR_SIDE = {vehicle_pb2.DOOR_ID_FRONT_LEFT: "left", vehicle_pb2.DOOR_ID_REAR_LEFT: "left",
              vehicle_pb2.DOOR_ID_FRONT_RIGHT: "right", vehicle_pb2.DOOR_ID_REAR_RIGHT: "right"}
_SEAT_SIDES = {vehicle_pb2.SEAT_ID_DRIVER: ("left",), vehicle_pb2.SEAT_ID_REAR_LEFT: ("left",),
               vehicle_pb2.SEAT_ID_FRONT_PASSENGER: ("right",), vehicle_pb2.SEAT_ID_REAR_RIGHT: ("right",),
               vehicle_pb2.SEAT_ID_REAR_CENTER: ("left", "right")}


def armed_sides(v: vehicle_pb2.VehicleState, cfg: SafetyConfig) -> set[str]:
    """Sides where someone may get out now: the car stands, and a door there is open, its handle pulled, or a
    seat on that side is occupied (the hold must come before the door opens)."""
    if v.speed_kmh >= cfg.exit_speed_kmh:
        return set()
    sides = {_DOOR_SIDE[d.door] for d in v.doors if (d.open or d.handle_pulled) and d.door in _DOOR_SIDE}
    for seat in v.seats:
        if seat.occupancy == vehicle_pb2.OCCUPANCY_OCCUPIED:
            sides.update(_SEAT_SIDES.get(seat.seat, ()))
    return sides


class SafeExit:
    """Safety's safe-exit half: warnings (event + door-lock hold per door of that side), lifted once passed."""

    def __init__(self, skill):
        self.skill, self.cfg = skill, skill.config
        self.watch = ExitWatch(self.cfg)
        self.sides: set[str] = set()
        self.warnings: dict[int, dict] = {}       # event cursor -> {"key", "side", "since", "action_ids", ...}

    def restore(self) -> None:
        now = self.skill.now
        for name in self.skill.store.names("exit:"):
            doc = self.skill.store.load(name)
            if doc is None or now - doc["since"] > self.cfg.exit_hold_seconds:
                self.skill.store.delete(name)      # its holds expired by themselves meanwhile
                continue
            doc["key"] = tuple(doc["key"])
            self.warnings[doc["cursor"]] = doc
        self.sides = armed_sides(self.skill.vehicle, self.cfg)

    def on_vehicle(self, current) -> None:
        self.sides = armed_sides(current, self.cfg)

    def needs(self, position: str) -> bool:
        """Whether this camera sees the path of a door someone may open now."""
        return any(side in self.sides for side in self.cfg.door_path_zones.get(position, {}))

    async def on_frame(self, analysis: FrameAnalysis) -> None:
        arrived = time.perf_counter()
        age = max(0.0, self.skill.now - analysis.timestamp)
        for approach in self.watch.update(analysis, self.sides):
            self._warn(approach, analysis, arrived, age)
        for key, _side in self.watch.passed(analysis.camera_id, analysis.timestamp):
            self._lift(key, "the object has passed")
        if self.needs(analysis.position):
            self.skill.record_latency(time.perf_counter() - arrived)

    def _warn(self, a: Approach, analysis: FrameAnalysis, arrived: float, age: float) -> None:
        cfg, skill = self.cfg, self.skill
        d = a.detection
        message = f"Wait: a {d.label} is approaching from behind on the {a.side}"
        decided = time.perf_counter()
        event = skill.emit("safe_exit_warning", common_pb2.SEVERITY_CRITICAL, message, {
            "side": a.side, "doors": list(SIDE_DOORS[a.side]), "object": d.label, "score": round(d.score, 3),
            "ttc_s": round(a.ttc_s, 3), "scale_rate": round(a.scale_rate, 3), "looming": round(a.scale_rate, 3),
            "actions": ["cabin_warning", "door_lock_hold"], "frame_age_s": round(age, 6),
            "decision_s": round(decided - arrived, 6), "budget_s": skill.latency_budget()},
            camera_id=analysis.camera_id)
        latency = age + (time.perf_counter() - arrived)
        EXIT_WARNING_LATENCY.observe(latency)
        skill.record_latency(latency)   # frame capture to committed warning, against Safety's one budget
        skill.last_exit_latency = latency
        ids = []
        for door in SIDE_DOORS[a.side]:
            action = skill.act("door_lock_hold", reason=message, cause_event=event, target=door,
                               expiry_s=cfg.exit_hold_seconds, key=f"safety:exit:{event.cursor}:{door}")
            if action is not None:
                ids.append(action.id)
        doc = {"cursor": event.cursor, "key": list(a.key), "side": a.side, "since": skill.now, "detail": message,
               "camera_id": analysis.camera_id, "action_ids": ids}
        skill.store.save(f"exit:{event.cursor}", doc)
        doc["key"] = a.key
        self.warnings[event.cursor] = doc

    def _lift(self, key: tuple, how: str) -> None:
        for cursor, doc in list(self.warnings.items()):
            if doc["key"] == key:
                self.resolve(cursor, how)

    def tick(self) -> None:
        """Holds whose camera went quiet, or past their life, are lifted (the gateway also expires them)."""
        now = self.skill.now
        for cursor, doc in list(self.warnings.items()):
            track = self.watch.tracks.get(doc["key"])
            quiet = track is None or now - track.last_seen >= self.cfg.exit_passed_seconds
            held = now - doc["since"]
            if held >= self.cfg.exit_hold_seconds or (quiet and held >= self.cfg.exit_passed_seconds):
                self.resolve(cursor, "the object has passed" if quiet else "hold time over")

    def alerts(self) -> dict:
        return {c: ActiveAlert("safe_exit_warning", d["since"], d["detail"], d["camera_id"], c, 1, d["action_ids"])
                for c, d in self.warnings.items()}

    def resolve(self, cursor: int, how: str) -> bool:
        doc = self.warnings.pop(cursor, None)
        if doc is None:
            return False
        skill = self.skill
        skill.store.delete(f"exit:{cursor}")
        skill._cancel(doc["action_ids"], how)
        skill.emit("safe_exit_cleared", common_pb2.SEVERITY_INFO, f"Safe to open on the {doc['side']}: {how}",
                   {"alert_cursor": cursor, "side": doc["side"], "how": how}, camera_id=doc["camera_id"])
        return True
