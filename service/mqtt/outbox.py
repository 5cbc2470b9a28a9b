"""The durable outbox behind MQTT: the event log and the action queue are the outbox rows (each is committed
before anything else happens), and this table holds how far the broker has acknowledged each of them.

A cursor moves only after the broker's PUBACK for every message up to it, in the same order, so a broker that is
down, a dropped connection or a kill -9 between commit and publish loses nothing: the next connection starts
again after the last acknowledged cursor (at-least-once, as QoS 1 is; every payload carries its id).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from incar.v1 import actions_pb2, common_pb2
from service.store.db import Database

MIGRATIONS = [
    """
    CREATE TABLE mqtt_outbox_cursors (
        source TEXT PRIMARY KEY,
        cursor INTEGER NOT NULL
    );
    """,
]

EVENTS, NOTIFICATIONS = "events", "notifications"


@dataclass(frozen=True)
class Outgoing:
    source: str
    cursor: int
    topic: str
    payload: bytes
    action_id: str = ""       # owner notifications: acknowledged once the broker has it


class Outbox:
    def __init__(self, db: Database, events, actions, *, base_topic: str, event_kinds=()):
        self.db, self.events, self.actions = db, events, actions
        self.base_topic = base_topic
        self.event_kinds = list(event_kinds)
        db.register_migrations("mqtt", MIGRATIONS)

    def prepare(self) -> None:
        """After migrate(): a first start begins at what is there now (history is not replayed to a new broker);
        from then on every committed event and notification is owed to the broker until it acknowledges it."""
        latest = ((EVENTS, self.events.latest_cursor()), (NOTIFICATIONS, self.actions.latest_cursor()))
        with self.db.transaction() as tx:
            for source, cursor in latest:
                tx.execute("INSERT OR IGNORE INTO mqtt_outbox_cursors(source, cursor) VALUES(?, ?)", (source, cursor))

    def cursors(self) -> dict[str, int]:
        rows = self.db.connect().execute("SELECT source, cursor FROM mqtt_outbox_cursors").fetchall()
        return {r["source"]: r["cursor"] for r in rows}

    def backlog(self) -> dict[str, int]:
        done = self.cursors()
        return {EVENTS: max(0, self.events.latest_cursor() - done.get(EVENTS, 0)),
                NOTIFICATIONS: max(0, self.actions.latest_cursor() - done.get(NOTIFICATIONS, 0))}

    def pending(self, limit: int) -> list[Outgoing]:
        """What is owed, oldest first: notifications before events (an owner waiting on a child alert first)."""
        done = self.cursors()
        out = [self._notification(a) for a in self.actions.first_deliveries("owner_notification",
                                                                             done.get(NOTIFICATIONS, 0), limit)]
        if len(out) < limit:
            out += [self._event(e) for e in self.events.after(done.get(EVENTS, 0), limit - len(out),
                                                                self.event_kinds)]
        return out

    def advance(self, published: list[Outgoing]) -> None:
        """Record that the broker acknowledged everything in `published` (their highest cursor per source)."""
        top: dict[str, int] = {}
        for item in published:
            top[item.source] = max(top.get(item.source, 0), item.cursor)
        self._move(top)

    def _move(self, cursors: dict[str, int]) -> None:
        with self.db.transaction() as tx:
            for source, cursor in cursors.items():
                tx.execute("UPDATE mqtt_outbox_cursors SET cursor = MAX(cursor, ?) WHERE source = ?",
                           (cursor, source))

    def skip_idle(self) -> None:
        """Nothing is owed: move both cursors to the newest rows (filtered-out events, repeat deliveries), so the
        next read starts there. The newest cursors are read first: whatever is committed after that lies beyond
        them, and anything owed up to them shows in `pending` (no write lock held: the event log's writer and
        its flush must be able to commit meanwhile)."""
        tops = {EVENTS: self.events.latest_cursor(), NOTIFICATIONS: self.actions.latest_cursor()}
        if self.pending(1):
            return
        self._move(tops)

    def _event(self, event: common_pb2.Event) -> Outgoing:
        body = {"cursor": event.cursor, "time": event.time.ToJsonString(), "kind": event.kind, "skill": event.skill,
                "severity": common_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_").lower(),
                "camera_id": event.camera_id, "message": event.message,
                "payload": json.loads(event.payload_json) if event.payload_json else {},
                "attachment_ids": list(event.attachment_ids)}
        topic = f"{self.base_topic}/events/{event.kind.replace('.', '/')}"
        return Outgoing(EVENTS, event.cursor, topic, _json(body))

    def _notification(self, action: actions_pb2.VehicleAction) -> Outgoing:
        body = {"id": action.id, "title": action.parameters.get("title", ""), "body": action.parameters["body"],
                "priority": actions_pb2.ActionPriority.Name(action.priority).removeprefix("ACTION_PRIORITY_").lower(),
                "reason": action.reason, "requested_by": action.requested_by,
                "cause_event_cursor": action.cause_event_cursor, "cause_event_kind": action.cause_event_kind,
                "created": action.created.ToJsonString(), "expires": action.expires.ToJsonString(),
                "parameters": {k: v for k, v in action.parameters.items() if k not in ("title", "body")}}
        return Outgoing(NOTIFICATIONS, action.cursor, f"{self.base_topic}/notifications", _json(body), action.id)


def _json(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
