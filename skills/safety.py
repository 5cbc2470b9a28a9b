"""Safety around getting on and off: child left behind, safe-exit warning, items left behind.

Child presence: after locking, the cabin camera is watched for `monitor_seconds`; a person, a face or small
motion in the seat zones on `child_confirm_frames` consecutive frames starts the escalation timeline:
  t0 + first_warning_delay_seconds   level 1: in-car visual and audible warning
  t0 + owner_notification_seconds    level 2: owner notification (phone)
  then every repeat_seconds          level 3, 4, ...: the notification again, up to max_notifications
until someone acknowledges it (Safety.Acknowledge) or the car is unlocked. The defaults (0 s, 30 s, 60 s) follow
the order Euro NCAP's child presence detection protocol asks for — occupants first, then the owner, repeated —
with times well inside its limits; they are configuration, not constants.

Safe exit: a door handle pulled or a door open below `exit_speed_kmh`, and a bicycle, motorcycle or car on that
side's camera approaching (perception's looming, or the box growing between frames) -> a CRITICAL warning.
Frame-to-warning latency (frame age on arrival + decision + durable commit) goes into
`incar_safety_exit_warning_latency_seconds`, and over-budget warnings into the skill's violation counter.

Items left behind: after locking, with every seat empty and no person in the cabin, a bag or phone seen on
`item_confirm_frames` consecutive frames -> one warning per item kind per locked period.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
from prometheus_client import Histogram

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service.perception.types import Detection, FrameAnalysis
from skills.base import (NotFoundError, Skill, SkillContext, area, centre, inside, overlap, to_pixels)
from skills.config import SafetyConfig

log = structlog.get_logger(__name__)

EXIT_WARNING_LATENCY = Histogram(
    "incar_safety_exit_warning_latency_seconds", "Safe-exit warning: frame capture to committed warning",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0))

LEFT_DOORS = {vehicle_pb2.DOOR_ID_FRONT_LEFT, vehicle_pb2.DOOR_ID_REAR_LEFT}
RIGHT_DOORS = {vehicle_pb2.DOOR_ID_FRONT_RIGHT, vehicle_pb2.DOOR_ID_REAR_RIGHT}


@dataclass
class ActiveAlert:
    kind: str
    since: float
    detail: str
    camera_id: str = ""
    event_cursor: int = 0            # the first event of this alert: what Acknowledge names
    escalation_level: int = 0
    notifications: int = 0
    expires: float | None = None
    payload: dict = field(default_factory=dict)


class Safety(Skill):
    name = "safety"

    def __init__(self, ctx: SkillContext, config: SafetyConfig | None = None):
        super().__init__(ctx)
        self.config = config or SafetyConfig()
        self.budget_s = self.config.budget_seconds
        self.active: dict[int, ActiveAlert] = {}
        self._lock_time: float | None = None
        self._child_frames = 0
        self._child: ActiveAlert | None = None
        self._item_frames: dict[str, int] = {}
        self._items_reported: set[str] = set()
        self._previous_boxes: dict[tuple[str, object], tuple[float, float]] = {}   # (camera, key) -> (t, area)
        self._last_exit_warning: dict[tuple[str, str], float] = {}

    # ------------------------------------------------------------------ vehicle
    async def on_vehicle(self, previous, current) -> None:
        if current.locked and not previous.locked:
            self._lock_time = self.now
            self._child_frames = 0
            self._item_frames.clear()
            self._items_reported.clear()
        elif previous.locked and not current.locked:
            self._lock_time = None
            for cursor, alert in list(self.active.items()):
                if alert.kind in ("child_left_behind", "item_left_behind"):
                    self._resolve(cursor, "car unlocked")

    def _watching_cabin(self) -> bool:
        return (self._lock_time is not None and self.vehicle.locked
                and self.now - self._lock_time <= self.config.monitor_seconds)

    # ------------------------------------------------------------------ frames
    async def on_frame(self, analysis: FrameAnalysis) -> None:
        arrived = time.perf_counter()
        age = max(0.0, self.now - analysis.timestamp)
        if analysis.role == "exterior":
            await self._safe_exit(analysis, arrived, age)
        elif analysis.role == "cabin" and self._watching_cabin():
            with self.measure():
                self._cabin(analysis)
            await self.tick()

    def _cabin(self, analysis: FrameAnalysis) -> None:
        cfg, frame = self.config, analysis.frame
        seats = [to_pixels(z, frame) for z in cfg.seat_zones]
        in_seats = lambda box: any(inside(centre(box), z) for z in seats)   # noqa: E731
        people = [d for d in analysis.detections if d.label == "person" and d.score >= cfg.child_min_score
                  and in_seats(d.box)]
        faces = [f for f in analysis.faces if f.score >= cfg.child_min_score and in_seats(f.box)]
        moved = 0.0
        if analysis.motion is not None:
            moved = max((min(1.0, sum(overlap(r, z) for r in analysis.motion.regions) / max(area(z), 1.0))
                         for z in seats), default=0.0)
        present = bool(people or faces or moved >= cfg.seat_motion_fraction)
        self._child_frames = self._child_frames + 1 if present else 0
        if self._child is None and self._child_frames >= cfg.child_confirm_frames:
            cues = (["person"] if people else []) + (["face"] if faces else []) + \
                (["motion"] if moved >= cfg.seat_motion_fraction else [])
            self._child = ActiveAlert("child_left_behind", self.now,
                                      f"occupant detected in the cabin after locking ({', '.join(cues)})",
                                      camera_id=analysis.camera_id, payload={"cues": cues})
            log.warning("safety.child_detected", cues=cues, camera_id=analysis.camera_id)
        # Items: only once everyone has left.
        occupied = any(s.occupancy == vehicle_pb2.OCCUPANCY_OCCUPIED for s in self.vehicle.seats)
        anyone = occupied or any(d.label == "person" and d.score >= cfg.child_min_score for d in analysis.detections)
        seen = {d.label for d in analysis.detections if d.label in cfg.item_labels and d.score >= cfg.item_min_score}
        for label in cfg.item_labels:
            self._item_frames[label] = self._item_frames.get(label, 0) + 1 if (label in seen and not anyone) else 0
            if self._item_frames[label] >= cfg.item_confirm_frames and label not in self._items_reported:
                self._items_reported.add(label)
                event = self.emit("item_left_behind", common_pb2.SEVERITY_WARNING,
                                  f"A {label} was left in the car", {"item": label, "escalation_level": 1},
                                  camera_id=analysis.camera_id)
                self.active[event.cursor] = ActiveAlert("item_left_behind", self.now, f"{label} left in the cabin",
                                                        analysis.camera_id, event.cursor, 1)

    # ------------------------------------------------------------------ child escalation timeline
    async def tick(self) -> None:
        now = self.now
        for cursor, alert in list(self.active.items()):
            if alert.expires is not None and now >= alert.expires:
                del self.active[cursor]
        child = self._child
        if child is None:
            return
        cfg = self.config
        elapsed = now - child.since
        if child.escalation_level == 0 and elapsed >= cfg.first_warning_delay_seconds:
            self._escalate(child, 1, ["in_car_visual", "in_car_audible"], common_pb2.SEVERITY_WARNING,
                           "Child presence warning: someone may still be in the car")
        while child.escalation_level >= 1 and child.notifications < cfg.max_notifications:
            due = cfg.owner_notification_seconds + child.notifications * cfg.repeat_seconds
            if elapsed < due:
                break
            child.notifications += 1
            self._escalate(child, child.escalation_level + 1, ["owner_notification", "in_car_visual",
                                                              "in_car_audible"], common_pb2.SEVERITY_CRITICAL,
                           f"Someone may be left in the locked car (notification {child.notifications})")

    def _escalate(self, child: ActiveAlert, level: int, actions: list[str], severity: int, message: str) -> None:
        child.escalation_level = level
        payload = {"escalation_level": level, "actions": actions, "detected_at": child.since,
                   "seconds_since_detection": round(self.now - child.since, 3), **child.payload}
        if child.event_cursor:
            payload["alert_cursor"] = child.event_cursor
        event = self.emit("child_left_behind", severity, message, payload, camera_id=child.camera_id)
        if not child.event_cursor:
            child.event_cursor = event.cursor
            self.active[event.cursor] = child

    # ------------------------------------------------------------------ safe exit
    def _exit_sides(self) -> set[str]:
        v = self.vehicle
        if v.speed_kmh >= self.config.exit_speed_kmh:
            return set()
        sides = set()
        for door in v.doors:
            if door.open or door.handle_pulled:
                if door.door in LEFT_DOORS:
                    sides.add("left")
                elif door.door in RIGHT_DOORS:
                    sides.add("right")
        return sides

    async def _safe_exit(self, analysis: FrameAnalysis, arrived: float, age: float) -> None:
        cfg = self.config
        started = time.perf_counter()
        hazards = [d for d in analysis.detections if d.label in cfg.exit_hazard_labels and d.score >= cfg.exit_min_score]
        growth = {id(d): self._growth(analysis, d) for d in hazards}   # keep box history even with doors shut
        side = analysis.position
        if side not in self._exit_sides() or not hazards:
            return
        approaching = [d for d in hazards if max(d.looming, growth[id(d)]) >= cfg.exit_looming_per_second]
        if not approaching:
            self.record_latency(time.perf_counter() - started)
            return
        hazard = max(approaching, key=lambda d: max(d.looming, growth[id(d)]))
        key = (side, hazard.label)
        last = self._last_exit_warning.get(key)
        if last is not None and self.now - last < cfg.exit_warning_cooldown_seconds:
            return
        self._last_exit_warning[key] = self.now
        doors = [vehicle_pb2.DoorId.Name(d.door).removeprefix("DOOR_ID_").lower() for d in self.vehicle.doors
                 if (d.open or d.handle_pulled) and d.door in (LEFT_DOORS if side == "left" else RIGHT_DOORS)]
        decided = time.perf_counter()
        event = self.emit("safe_exit_warning", common_pb2.SEVERITY_CRITICAL,
                          f"Wait: a {hazard.label} is approaching from behind on the {side}",
                          {"side": side, "doors": doors, "object": hazard.label, "score": round(hazard.score, 3),
                           "looming": round(max(hazard.looming, growth[id(hazard)]), 3),
                           "frame_age_s": round(age, 6), "decision_s": round(decided - arrived, 6),
                           "budget_s": cfg.exit_warning_budget_seconds},
                          camera_id=analysis.camera_id)
        latency = age + (time.perf_counter() - arrived)
        EXIT_WARNING_LATENCY.observe(latency)
        within = self.record_latency(latency, cfg.exit_warning_budget_seconds)
        self.last_exit_latency = latency
        self.active[event.cursor] = ActiveAlert("safe_exit_warning", self.now, event.message, analysis.camera_id,
                                                event.cursor, 1, expires=self.now + cfg.exit_warning_cooldown_seconds,
                                                payload={"latency_s": latency, "within_budget": within})

    def _growth(self, analysis: FrameAnalysis, det: Detection) -> float:
        """Relative box-area growth per second against the same track (or label) in this camera's last frame."""
        key = (analysis.camera_id, det.track_id if det.track_id is not None else det.label)
        now_area = area(det.box)
        previous = self._previous_boxes.get(key)
        self._previous_boxes[key] = (analysis.timestamp, now_area)
        if previous is None or previous[1] <= 0 or analysis.timestamp <= previous[0]:
            return 0.0
        return (now_area / previous[1] - 1.0) / (analysis.timestamp - previous[0])

    # ------------------------------------------------------------------ status
    def status(self) -> skills_pb2.SafetyStatus:
        self._expire()
        out = skills_pb2.SafetyStatus()
        for cursor, alert in sorted(self.active.items()):
            item = out.active.add(event_cursor=cursor, kind=alert.kind, escalation_level=alert.escalation_level,
                                  detail=alert.detail)
            item.since.FromNanoseconds(int(alert.since * 1e9))
        return out

    def _expire(self) -> None:
        now = self.now
        for cursor, alert in list(self.active.items()):
            if alert.expires is not None and now >= alert.expires:
                del self.active[cursor]

    def acknowledge(self, event_cursor: int) -> None:
        if event_cursor not in self.active:
            raise NotFoundError(f"no active safety alert with event cursor {event_cursor}")
        self._resolve(event_cursor, "acknowledged")

    def _resolve(self, cursor: int, how: str) -> None:
        alert = self.active.pop(cursor)
        if alert is self._child:
            self._child = None
            self._child_frames = 0
            self._lock_time = None     # handled by a person: stop watching until the next lock
        self.emit(f"{alert.kind}_resolved", common_pb2.SEVERITY_INFO, f"{alert.kind.replace('_', ' ')}: {how}",
                  {"alert_cursor": cursor, "how": how, "escalation_level": alert.escalation_level},
                  camera_id=alert.camera_id)
