"""Safety around getting on and off: someone left in the car, safe exit, items left behind.

Child presence (Euro NCAP CPD): after locking a parked car, or when a parked, unlocked car's doors close with
nobody in the driver's seat, the cabin cameras are watched (`skills.safety_presence`: people, faces, bodies and
motion per seat zone, judged over the frames the detectors analysed; a child/adult estimate from the face; pets
apart). A confirmed occupant starts the ladder of `escalation` steps (cabin warning -> owner notification ->
horn and hazards -> climate and vent -> emergency call), each an event plus vehicle actions, then repeated owner
notifications, until Safety.Acknowledge or the car is opened. Watch and alert are durable (`skills.safety_state`):
a restart resumes the same alert at the same level, on the same timeline.

Safe exit (Hyundai/Kia SEA) is `skills.safety_exit.SafeExit`; items left behind are reported to the owner
when the driver has left and locked the car.
"""
from __future__ import annotations

import structlog

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service.perception.types import FrameAnalysis
from skills.base import NotFoundError, Skill, SkillContext, is_moving
from skills.safety_config import SafetyConfig
from skills.safety_exit import EXIT_WARNING_LATENCY, SafeExit   # noqa: F401  (the histogram is exported)
from skills.safety_presence import PresenceTracker
from skills.safety_state import ActiveAlert, ChildAlert, SafetyStore, Watch

log = structlog.get_logger(__name__)

DRIVER = vehicle_pb2.SEAT_ID_DRIVER
SEAT_NAMES = {vehicle_pb2.SEAT_ID_DRIVER: "driver", vehicle_pb2.SEAT_ID_FRONT_PASSENGER: "front_passenger",
              vehicle_pb2.SEAT_ID_REAR_LEFT: "rear_left", vehicle_pb2.SEAT_ID_REAR_CENTER: "rear_center",
              vehicle_pb2.SEAT_ID_REAR_RIGHT: "rear_right"}


def occupied(state: vehicle_pb2.VehicleState, seat: int) -> bool:
    return any(s.seat == seat and s.occupancy == vehicle_pb2.OCCUPANCY_OCCUPIED for s in state.seats)


def any_door_open(state: vehicle_pb2.VehicleState) -> bool:
    return any(d.open for d in state.doors)


class Safety(Skill):
    name = "safety"

    def __init__(self, ctx: SkillContext, config: SafetyConfig | None = None):
        super().__init__(ctx)
        self.config = config or SafetyConfig()
        self.store = SafetyStore(ctx.db, ctx.clock)
        self.presence = PresenceTracker(self.config)
        self.exit = SafeExit(self)
        self.watch: Watch | None = None
        self.child: ChildAlert | None = None
        self.items: dict[int, ActiveAlert] = {}        # item alerts of this locked period, by event cursor
        self._items_reported: set[str] = set()         # "seat/item" already told
        self._restored = False

    # ------------------------------------------------------------------ durable state
    def _restore(self) -> None:
        """Once, after the database is migrated: bring back the watch, the alert and the items, then check them
        against the vehicle as it is now (a lock this process never saw is watched from now on)."""
        if self._restored:
            return
        self._restored = True
        self.watch, self.child = self.store.watch(), self.store.child()
        doc = self.store.load("items") or {}
        self._items_reported = set(doc.get("reported", []))
        for item in doc.get("alerts", []):
            self.items[item["event_cursor"]] = ActiveAlert(**item)
        if self.child is not None:
            log.warning("safety.alert_restored", kind=self.child.kind, step=self.child.step,
                        cursor=self.child.event_cursor)
        v = self.vehicle
        if self.watch is None and v.locked and not is_moving(v):
            self._start_watch("locked")
        elif self.watch is not None and not self._watch_holds(v):
            self._stop_watch("the car was opened while the service was down")
        self.exit.restore()

    def _save_items(self) -> None:
        self.store.save("items", {"reported": sorted(self._items_reported),
                                  "alerts": [vars(a) for a in self.items.values()]})

    # ------------------------------------------------------------------ vehicle
    async def on_vehicle(self, previous, current) -> None:
        self._restore()
        if current.locked and not previous.locked and not is_moving(current):
            self._items_reported.clear()
            self._save_items()
            if self.watch is None or self.watch.reason != "locked":
                self._start_watch("locked")
        elif (not current.locked and not is_moving(current) and any_door_open(previous)
              and not any_door_open(current) and not occupied(current, DRIVER) and self.watch is None):
            self._start_watch("closed_with_occupant")   # closed up with nobody at the wheel: who is inside?
        elif self.watch is not None and not self._watch_holds(current):
            self._stop_watch("car unlocked" if previous.locked and not current.locked else "someone is back")
        if previous.locked and not current.locked:
            for cursor in list(self.items):
                self._resolve(cursor, "car unlocked")
        self.exit.on_vehicle(current)

    def _watch_holds(self, v: vehicle_pb2.VehicleState) -> bool:
        if self.watch is None or is_moving(v) or v.ignition == vehicle_pb2.IGNITION_ON:
            return False
        if self.watch.reason == "locked":
            return v.locked
        return not any_door_open(v) and not occupied(v, DRIVER)

    def _start_watch(self, reason: str) -> None:
        self.watch = Watch(reason, self.now)
        self.presence.reset()
        self.store.save("watch", self.watch)
        log.info("safety.watching", reason=reason)

    def _stop_watch(self, how: str) -> None:
        self.watch = None
        self.presence.reset()
        self.store.delete("watch")
        if self.child is not None:
            self._resolve(self.child.event_cursor, how)

    def needs_camera(self, role: str, position: str) -> bool:
        """For the analysis pipeline's safety lane: does Safety need this camera's frames first, now?"""
        self._restore()
        if role == "cabin":
            return self.watch is not None
        return self.exit.needs(position)

    # ------------------------------------------------------------------ frames
    async def on_frame(self, analysis: FrameAnalysis) -> None:
        self._restore()
        if analysis.role == "exterior":
            await self.exit.on_frame(analysis)
        elif analysis.role == "cabin" and self.watch is not None:
            with self.measure():
                self._cabin(analysis)
            await self.tick()

    def _cabin(self, analysis: FrameAnalysis) -> None:
        if not self.presence.add(analysis):
            return
        occupants = self.presence.confirmed()
        people = [o for o in occupants if o.kind == "person"]
        if self.child is None and occupants:
            kind = "child_left_behind" if people else "pet_left_behind"
            self.child = ChildAlert(kind, self.now, analysis.camera_id, [o.as_dict() for o in occupants])
            log.warning("safety.occupant_confirmed", kind=kind, occupants=self.child.occupants)
        elif self.child is not None and people and self.child.kind == "pet_left_behind":
            self.child.kind = "child_left_behind"   # a person found beside the pet: the person's ladder from here
            self.child.occupants = [o.as_dict() for o in occupants]
        if self.watch is not None and self.watch.reason == "locked" and not people and not any(
                occupied(self.vehicle, seat) for seat in SEAT_NAMES):
            self._items(analysis)

    def _items(self, analysis: FrameAnalysis) -> None:
        for (seat, item), camera_id in sorted(self.presence.items().items()):
            tag = f"{seat}/{item}"
            if tag in self._items_reported:
                continue
            self._items_reported.add(tag)
            where = seat.replace("_", " ")
            where = "in the car" if seat == "cabin" else f"on the {where} seat"
            message = f"A {item} was left {where}"
            event = self.emit("item_left_behind", common_pb2.SEVERITY_WARNING, message,
                              {"item": item, "seat": seat, "escalation_level": 1}, camera_id=camera_id)
            action = self.act("owner_notification", reason=message, cause_event=event,
                              key=f"safety:item:{event.cursor}",
                              parameters={"title": "Left in the car", "body": message + "."})
            self.items[event.cursor] = ActiveAlert("item_left_behind", self.now, message, camera_id, event.cursor,
                                                   1, [action.id] if action is not None else [])
        self._save_items()

    # ------------------------------------------------------------------ the escalation ladder
    async def tick(self) -> None:
        self._restore()
        now, cfg = self.now, self.config
        if self.watch is not None and self.child is None and now - self.watch.since > cfg.monitor_seconds:
            log.info("safety.watch_ended", reason="monitor_seconds passed with nobody found")
            self._stop_watch("monitoring time over")
        self.exit.tick()
        child = self.child
        if child is None:
            return
        elapsed = now - child.since
        while child.step < len(cfg.escalation) and elapsed >= cfg.escalation[child.step].after_seconds:
            self._step(child, cfg.escalation[child.step])
        first = cfg.owner_notification_seconds
        while (first is not None and 0 < child.notifications < cfg.max_notifications
               and elapsed >= first + child.notifications * cfg.notification_repeat_seconds):
            self._notify(child, repeat=True)

    def _step(self, child: ChildAlert, step) -> None:
        level = child.step + 1
        severity = common_pb2.SEVERITY_WARNING if level == 1 else common_pb2.SEVERITY_CRITICAL
        who = "A pet" if child.kind == "pet_left_behind" else _who(child.occupants)
        message = step.message or f"{who} may be left in the car"
        if child.kind == "pet_left_behind":
            message = message.replace("Someone", "A pet").replace("someone", "a pet")
        event = self._event(child, level, severity, message, ["cabin_warning", *step.actions])
        if not child.event_cursor:
            child.event_cursor = event.cursor
        for kind in step.actions:
            if kind == "owner_notification":
                self._notify(child, repeat=False, cause=event)
                continue
            action = self.act(kind, reason=f"{message} (level {level})", cause_event=event,
                              key=f"safety:{child.event_cursor}:{level}:{kind}", priority="critical"
                              if kind == "emergency_call" else "safety", parameters=_parameters(kind, message))
            if action is not None:
                child.action_ids.append(action.id)
        child.step = level
        self.store.save("child", child)

    def _notify(self, child: ChildAlert, *, repeat: bool, cause=None) -> None:
        n = child.notifications + 1
        body = f"{_who(child.occupants) if child.kind == 'child_left_behind' else 'A pet'} may be left in your " \
               f"locked car ({_seats(child.occupants)})"
        if repeat:
            cause = self._event(child, child.step, common_pb2.SEVERITY_CRITICAL,
                                f"Still no answer: {body} (notification {n})", ["owner_notification"],
                                notification=n)
        action = self.act("owner_notification", reason=body, cause_event=cause, key=f"safety:{child.event_cursor}:"
                          f"notify:{n}", priority="safety", parameters={"title": "Check your car now", "body": body})
        if action is not None:
            child.action_ids.append(action.id)
        child.notifications = n
        self.store.save("child", child)

    def _event(self, child: ChildAlert, level: int, severity: int, message: str, actions: list[str], **extra):
        payload = {"escalation_level": level, "actions": actions, "detected_at": child.since,
                   "seconds_since_detection": round(self.now - child.since, 3), "occupants": child.occupants,
                   "watch": self.watch.reason if self.watch else "", **extra}
        if child.event_cursor:
            payload["alert_cursor"] = child.event_cursor
        return self.emit(child.kind, severity, message, payload, camera_id=child.camera_id)

    # ------------------------------------------------------------------ status and acknowledgement
    def alerts(self) -> dict[int, ActiveAlert]:
        self._restore()
        out = dict(self.items)
        if self.child is not None and self.child.event_cursor:
            c = self.child
            who = _who(c.occupants) if c.kind == "child_left_behind" else "A pet"
            out[c.event_cursor] = ActiveAlert(c.kind, c.since, f"{who} in the car ({_seats(c.occupants)})",
                                              c.camera_id, c.event_cursor, c.step, c.action_ids)
        out.update(self.exit.alerts())
        return out

    @property
    def active(self) -> dict[int, ActiveAlert]:
        return self.alerts()

    def status(self) -> skills_pb2.SafetyStatus:
        out = skills_pb2.SafetyStatus()
        for cursor, alert in sorted(self.alerts().items()):
            item = out.active.add(event_cursor=cursor, kind=alert.kind, escalation_level=alert.escalation_level,
                                  detail=alert.detail)
            item.since.FromNanoseconds(int(alert.since * 1e9))
        return out

    def acknowledge(self, event_cursor: int) -> None:
        if event_cursor not in self.alerts():
            raise NotFoundError(f"no active safety alert with event cursor {event_cursor}")
        self._resolve(event_cursor, "acknowledged")

    def _resolve(self, cursor: int, how: str) -> None:
        if self.child is not None and cursor == self.child.event_cursor:
            alert = self.child
            self.child = None
            level, kind, camera_id, actions = alert.step, alert.kind, alert.camera_id, alert.action_ids
            self.store.delete("child")
            if self.watch is not None:   # handled by a person: stop watching until the next lock or close-up
                self.watch = None
                self.store.delete("watch")
            self.presence.reset()
        elif cursor in self.items:
            item = self.items.pop(cursor)
            level, kind, camera_id, actions = item.escalation_level, item.kind, item.camera_id, item.action_ids
            self._save_items()
        elif self.exit.resolve(cursor, how):
            return
        else:
            return
        self._cancel(actions, how)
        self.emit(f"{kind}_resolved", common_pb2.SEVERITY_INFO, f"{kind.replace('_', ' ')}: {how}",
                  {"alert_cursor": cursor, "how": how, "escalation_level": level}, camera_id=camera_id)

    def _cancel(self, action_ids: list[str], how: str) -> None:
        if self.ctx.actions is None:
            return
        for action_id in action_ids:
            try:
                self.ctx.actions.cancel(action_id, how)
            except Exception as exc:    # an action already gone must not keep the alert open
                log.info("safety.cancel_failed", action=action_id, error=str(exc))


def _who(occupants: list[dict]) -> str:
    people = [o for o in occupants if o.get("kind") == "person"]
    if any(o.get("estimate") == "child" for o in people):
        return "A child"
    return "Someone" if people else "A pet"


def _seats(occupants: list[dict]) -> str:
    return ", ".join(sorted({o["seat"].replace("_", " ") for o in occupants})) or "cabin"


def _parameters(kind: str, message: str) -> dict[str, str]:
    if kind == "emergency_call":
        return {"message": message}
    if kind == "climate_on":
        return {"temperature_c": "21"}
    return {}
