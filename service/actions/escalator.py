"""Repeats and escalates safety actions the gateway has not acknowledged, and expires what is past its time.

Everything it decides is in the store (attempts, level, next repeat), so a restart resumes the same schedule.
Each step is also an event (`actions.unacknowledged`, `actions.expired`), so the HMI and MQTT see a car that is
not answering, and at `notify_owner_at_level` the owner is told through a path that does not need the gateway.
"""
from __future__ import annotations

import asyncio

import structlog

from incar.v1 import actions_pb2, common_pb2
from service.actions import metrics
from service.actions.queue import DELIVERY_SELECT, EXPIRED, LATEST, PENDING, SAFETY, ActionQueue

log = structlog.get_logger(__name__)

CRITICAL = actions_pb2.ACTION_PRIORITY_CRITICAL


class Escalator:
    def __init__(self, queue: ActionQueue, events=None):
        self.queue = queue
        self.events = events      # an EventSink (service.store.events.EventLog); None: no events

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:   # a store hiccup must not end the escalation schedule
                log.error("actions.tick_failed", error=repr(exc))
            await asyncio.sleep(self.queue.config.tick_s)

    def tick(self) -> list[actions_pb2.VehicleAction]:
        """One pass at the queue's clock: expire, repeat what is due; returns the repeats delivered."""
        queue, cfg = self.queue, self.queue.config
        now = queue.clock()
        conn = queue.db.connect()
        expired = conn.execute(f"{DELIVERY_SELECT} WHERE a.state = ? AND a.expires <= ? AND {LATEST}",
                               (PENDING, now)).fetchall()
        for row in expired:
            with queue.db.transaction() as tx:
                tx.execute("UPDATE actions SET state = ?, next_repeat = NULL WHERE id = ? AND state = ?",
                           (EXPIRED, row["id"], PENDING))
            metrics.EXPIRED.labels(row["kind"], actions_pb2.ActionPriority.Name(row["priority"])).inc()
            log.warning("action.expired", id=row["id"], kind=row["kind"], attempts=row["attempts"])
            if row["priority"] >= SAFETY:
                self._event("expired", common_pb2.SEVERITY_WARNING, row,
                            f"The car never confirmed {_words(row['kind'])} ({row['reason']}); it has expired")
        due = conn.execute(f"{DELIVERY_SELECT} WHERE a.state = ? AND a.next_repeat <= ? AND a.expires > ? "
                           f"AND {LATEST} ORDER BY a.next_repeat", (PENDING, now, now)).fetchall()
        repeats = []
        for row in due:
            level = min(row["escalation"] + 1, cfg.max_escalation_level)
            attempt = row["attempts"] + 1
            wait = min(cfg.ack_timeout_s * 2 ** (attempt - 2), cfg.max_repeat_interval_s)
            with queue.db.transaction() as tx:
                changed = tx.execute(
                    "UPDATE actions SET attempts = ?, escalation = ?, priority = ?, next_repeat = ? "
                    "WHERE id = ? AND state = ?",
                    (attempt, level, CRITICAL, now + wait, row["id"], PENDING)).rowcount
                if changed:
                    cursor = queue._deliver(tx, row["id"], PENDING, attempt, CRITICAL, level, now)
                    # Only the latest delivery is ever streamed; earlier repeats go. The first stays: the MQTT
                    # outbox publishes each owner notification from it.
                    tx.execute("DELETE FROM action_deliveries WHERE action_id = ? AND attempt > 1 AND cursor < ?",
                               (row["id"], cursor))
            if not changed:
                continue     # acknowledged or cancelled between the read and the write
            delivery = queue.get(row["id"]).action
            repeats.append(delivery)
            metrics.REPEATED.labels(row["kind"]).inc()
            if level > row["escalation"]:
                metrics.ESCALATED.labels(row["kind"], str(level)).inc()
            log.warning("action.repeated", id=row["id"], kind=row["kind"], attempt=attempt, level=level)
            queue._committed(delivery)
            if level > row["escalation"]:
                self._escalated(row, level, attempt)
        self._gauges(conn, now)
        return repeats

    def _escalated(self, row, level: int, attempt: int) -> None:
        severity = common_pb2.SEVERITY_CRITICAL if level >= 2 else common_pb2.SEVERITY_WARNING
        event = self._event("unacknowledged", severity, row,
                            f"The car has not confirmed {_words(row['kind'])} after {attempt - 1} "
                            f"deliveries ({row['reason']}); sending it again at level {level}",
                            level=level, attempt=attempt)
        notify_at = self.queue.config.notify_owner_at_level
        if notify_at and level == notify_at and row["kind"] != "owner_notification":
            self.queue.request(
                "owner_notification", priority="critical", requested_by="actions",
                cause_event=event if event is not None else row["cause_cursor"] or None,
                key=f"unacknowledged:{row['id']}",
                reason=f"the car did not confirm {_words(row['kind'])}",
                parameters={"title": "Your car is not responding",
                            "body": f"{row['reason']}. The car did not confirm {_words(row['kind'])} "
                                    f"after {attempt - 1} tries.",
                            "action_id": row["id"]})

    def _event(self, what: str, severity: int, row, message: str, **extra):
        if self.events is None:
            return None
        payload = {"action_id": row["id"], "kind": row["kind"], "cause_event_cursor": row["cause_cursor"], **extra}
        return self.events.append(f"actions.{what}", "actions", severity, message, payload)

    @staticmethod
    def _gauges(conn, now: float) -> None:
        for name, value in actions_pb2.ActionPriority.items():
            if value:
                metrics.PENDING.labels(name).set(0)
        for r in conn.execute("SELECT priority, COUNT(*) AS n FROM actions WHERE state = ? AND expires > ? "
                              "GROUP BY priority", (PENDING, now)).fetchall():
            metrics.PENDING.labels(actions_pb2.ActionPriority.Name(r["priority"])).set(r["n"])
        overdue = conn.execute("SELECT COUNT(*) AS n FROM actions WHERE state = ? AND attempts > 1 AND expires > ?",
                               (PENDING, now)).fetchone()["n"]
        metrics.OVERDUE.set(overdue)


def _words(kind: str) -> str:
    return {"horn": "the horn", "hazard_lights": "the hazard lights", "headlight_flash": "the headlight flash",
            "door_lock_hold": "the door-lock hold", "child_lock": "the child lock", "window_vent": "the window vent",
            "climate_on": "the climate", "emergency_call": "the emergency call",
            "owner_notification": "the owner notification",
            "seat_mirror_profile": "the seat and mirror profile"}.get(kind, kind)

