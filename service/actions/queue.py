"""The durable action queue: an action is committed to SQLite before the gateway sees it, like an event.

Each action is one row; each time it goes out (first, repeated, cancelled) is one delivery row with its own cursor.
The gateway's stream reads deliveries after its cursor, so a reconnect resumes where it left off, and only the
latest delivery of an action still to do is sent (a gateway back from an outage gets one horn, not five).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import structlog

from incar.v1 import actions_pb2, common_pb2
from service.actions import metrics
from service.actions.config import ActionsConfig
from service.rpc_errors import NotFoundError, PreconditionError
from service.actions.model import (MAX_REASON, ActionRequestError, cause_of, check_parameters, delivery_from_row,
                                   kind_name, priority_value, resolve_target, status_from_row)
from service.store.db import Database

log = structlog.get_logger(__name__)

PENDING, ACKNOWLEDGED = actions_pb2.ACTION_STATE_PENDING, actions_pb2.ACTION_STATE_ACKNOWLEDGED
EXPIRED, CANCELLED = actions_pb2.ACTION_STATE_EXPIRED, actions_pb2.ACTION_STATE_CANCELLED
SAFETY = actions_pb2.ACTION_PRIORITY_SAFETY
PAGE = 128

MIGRATIONS = [
    """
    CREATE TABLE actions (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        priority INTEGER NOT NULL,
        reason TEXT NOT NULL,
        cause_cursor INTEGER NOT NULL DEFAULT 0,
        cause_kind TEXT NOT NULL DEFAULT '',
        requested_by TEXT NOT NULL DEFAULT '',
        door INTEGER NOT NULL DEFAULT 0,
        seat INTEGER NOT NULL DEFAULT 0,
        parameters_json TEXT NOT NULL DEFAULT '{}',
        dedup_key TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        expires REAL NOT NULL,
        state INTEGER NOT NULL,
        result INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '',
        acknowledged REAL,
        attempts INTEGER NOT NULL DEFAULT 1,
        escalation INTEGER NOT NULL DEFAULT 0,
        next_repeat REAL
    );
    CREATE INDEX actions_due ON actions(state, next_repeat);
    CREATE INDEX actions_key ON actions(dedup_key, created);
    CREATE TABLE action_deliveries (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        action_id TEXT NOT NULL REFERENCES actions(id) ON DELETE CASCADE,
        time REAL NOT NULL,
        state INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        escalation INTEGER NOT NULL
    );
    CREATE INDEX deliveries_action ON action_deliveries(action_id, cursor);
    """,
]

# A delivery joined with its action; `latest` marks the newest delivery of that action.
DELIVERY_SELECT = """
    SELECT d.cursor, d.state AS d_state, d.attempt AS d_attempt, d.priority AS d_priority,
           d.escalation AS d_escalation, a.*
    FROM action_deliveries d JOIN actions a ON a.id = d.action_id
"""
LATEST = "d.cursor = (SELECT MAX(cursor) FROM action_deliveries WHERE action_id = a.id)"


class ActionNotFound(NotFoundError):
    """No action with that id."""


class ActionConflict(PreconditionError):
    """The action cannot take this answer (expired, cancelled, or already answered otherwise)."""


class _Doorbell:
    """Wakes every follower, on whichever loop it waits, after a commit (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def listen(self) -> asyncio.Event:
        bell = asyncio.Event()
        with self._lock:
            self._waiting.append((asyncio.get_running_loop(), bell))
        return bell

    def forget(self, bell: asyncio.Event) -> None:
        with self._lock:
            self._waiting = [w for w in self._waiting if w[1] is not bell]

    def ring(self) -> None:
        with self._lock:
            waiting = list(self._waiting)
        for loop, bell in waiting:
            try:
                loop.call_soon_threadsafe(bell.set)
            except RuntimeError:   # that loop has closed; its follower is gone
                pass


class ActionQueue:
    """The in-process API (skills call `request` and `cancel`) and the store behind the VehicleActions service."""

    def __init__(self, db: Database, config: ActionsConfig | None = None, *, clock=time.time):
        self.db = db
        self.config = config or ActionsConfig()
        self.clock = clock
        self._bell = _Doorbell()
        self._listeners: list = []
        db.register_migrations("actions", MIGRATIONS)

    def on_delivery(self, callback) -> None:
        """Call `callback(VehicleAction)` after each committed delivery (the escalator's events, MQTT's wake-up)."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------ what skills call
    def request(self, kind: str | int, *, reason: str, cause_event: common_pb2.Event | int | None = None,
                priority: str | int | None = None, expiry_s: float | None = None, target: str | int | None = None,
                parameters: Mapping[str, object] | None = None, key: str = "",
                requested_by: str = "") -> actions_pb2.VehicleAction:
        """Commit an action and wake the gateway's stream; returns its first delivery (`.id` names it).

        A non-empty `key` makes the request idempotent while that action lives: asking again (after a restart, on
        every tick) returns the existing action instead of a second horn. Raises ActionRequestError naming the field.
        """
        name = kind_name(kind)
        reason = (reason or "").strip()
        if not reason:
            raise ActionRequestError("reason: say why the car should do this")
        if len(reason) > MAX_REASON:
            raise ActionRequestError(f"reason: at most {MAX_REASON} characters")
        prio = priority_value(priority, name)
        door, seat = resolve_target(name, target)
        params = check_parameters(name, parameters)
        cause_cursor, cause_kind = cause_of(cause_event)
        life = self.config.expiry_s.get(name, 60.0) if expiry_s is None else float(expiry_s)
        if not life > 0:
            raise ActionRequestError(f"expiry_s: must be > 0, got {expiry_s!r}")
        now = self.clock()
        with self.db.transaction() as tx:
            existing = None
            if key:
                existing = tx.execute("SELECT id FROM actions WHERE dedup_key = ? AND expires > ? AND state != ? "
                                      "ORDER BY created DESC LIMIT 1", (key, now, CANCELLED)).fetchone()
            if existing is None:
                action_id = f"act-{uuid.uuid4().hex}"
                next_repeat = now + self.config.ack_timeout_s if prio >= SAFETY else None
                tx.execute(
                    "INSERT INTO actions(id, kind, priority, reason, cause_cursor, cause_kind, requested_by, door, "
                    "seat, parameters_json, dedup_key, created, expires, state, next_repeat) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (action_id, name, prio, reason, cause_cursor, cause_kind, requested_by, door, seat,
                     json.dumps(params, sort_keys=True), key, now, now + life, PENDING, next_repeat))
                self._deliver(tx, action_id, PENDING, 1, prio, 0, now)
        if existing is not None:
            return self.get(existing["id"]).action
        metrics.REQUESTED.labels(name, actions_pb2.ActionPriority.Name(prio)).inc()
        delivered = self.get(action_id).action
        log.info("action.requested", id=action_id, kind=name, priority=prio, requested_by=requested_by or None,
                 cause=cause_cursor or None)
        self._committed(delivered)
        return delivered

    def cancel(self, action_id: str, reason: str = "") -> actions_pb2.ActionStatus:
        """Tell the gateway to stop or lift it (a door hold once the cyclist has passed). Finished ones stay so."""
        now = self.clock()
        with self.db.transaction() as tx:
            row = self._row(tx, action_id)
            if row["state"] in (PENDING, ACKNOWLEDGED) and row["expires"] > now:
                tx.execute("UPDATE actions SET state = ?, next_repeat = NULL, detail = ? WHERE id = ?",
                           (CANCELLED, reason[:MAX_REASON] or row["detail"], action_id))
                self._deliver(tx, action_id, CANCELLED, row["attempts"], row["priority"], row["escalation"], now)
                cancelled = True
            else:
                cancelled = False
        status = self.get(action_id)
        if cancelled:
            metrics.CANCELLED.labels(row["kind"]).inc()
            self._committed(status.action)
        return status

    def get(self, action_id: str) -> actions_pb2.ActionStatus:
        return status_from_row(self._row(self.db.connect(), action_id))

    def find(self, key: str) -> actions_pb2.ActionStatus | None:
        """The newest action requested with this key, if any (skills resuming after a restart)."""
        row = self.db.connect().execute("SELECT id FROM actions WHERE dedup_key = ? ORDER BY created DESC LIMIT 1",
                                        (key,)).fetchone()
        return self.get(row["id"]) if row else None

    # ------------------------------------------------------------------ what the gateway calls
    def acknowledge(self, action_id: str, result: int, detail: str = "") -> actions_pb2.ActionStatus:
        """Record the gateway's answer. The same answer twice is fine (a retried RPC); a different one, or an
        answer to an expired or cancelled action, raises ActionConflict."""
        if result not in (actions_pb2.ACTION_RESULT_DONE, actions_pb2.ACTION_RESULT_FAILED,
                          actions_pb2.ACTION_RESULT_REJECTED):
            raise ActionRequestError(f"result: expected DONE, FAILED or REJECTED, got {result}")
        now = self.clock()
        with self.db.transaction() as tx:
            row = self._row(tx, action_id)
            if row["state"] == ACKNOWLEDGED and row["result"] == result:
                return status_from_row(row)
            if row["state"] != PENDING:
                state = actions_pb2.ActionState.Name(row["state"]).removeprefix("ACTION_STATE_").lower()
                answered = (f" with {actions_pb2.ActionResult.Name(row['result'])}"
                            if row["state"] == ACKNOWLEDGED else "")
                raise ActionConflict(f"action {action_id} is already {state}{answered}")
            if row["expires"] <= now:
                raise ActionConflict(f"action {action_id} expired {now - row['expires']:.1f}s ago; "
                                     "it was not to be performed after that")
            tx.execute("UPDATE actions SET state = ?, result = ?, detail = ?, acknowledged = ?, next_repeat = NULL "
                       "WHERE id = ?", (ACKNOWLEDGED, result, detail, now, action_id))
        metrics.ACKNOWLEDGED.labels(row["kind"], actions_pb2.ActionResult.Name(result)).inc()
        metrics.ACK_SECONDS.labels(row["kind"]).observe(max(0.0, now - row["created"]))
        log.info("action.acknowledged", id=action_id, kind=row["kind"], result=result, attempts=row["attempts"])
        return self.get(action_id)

    def acknowledge_all(self, action_ids: list[str], detail: str) -> int:
        """DONE for each action still pending and unexpired, in one transaction (the MQTT bridge, per batch the
        broker acknowledged); the others are left as they are. Returns how many were acknowledged."""
        now = self.clock()
        with self.db.transaction() as tx:
            rows = [tx.execute("SELECT id, kind, created FROM actions WHERE id = ? AND state = ? AND expires > ?",
                               (action_id, PENDING, now)).fetchone() for action_id in action_ids]
            rows = [r for r in rows if r is not None]
            for row in rows:
                tx.execute("UPDATE actions SET state = ?, result = ?, detail = ?, acknowledged = ?, "
                           "next_repeat = NULL WHERE id = ?",
                           (ACKNOWLEDGED, actions_pb2.ACTION_RESULT_DONE, detail, now, row["id"]))
        for row in rows:
            metrics.ACKNOWLEDGED.labels(row["kind"], "ACTION_RESULT_DONE").inc()
            metrics.ACK_SECONDS.labels(row["kind"]).observe(max(0.0, now - row["created"]))
        return len(rows)

    async def follow(self, after: int) -> AsyncIterator[actions_pb2.VehicleAction]:
        """Every delivery after `after` of an action still to do (or to lift), then live ones, forever."""
        cursor = after
        while True:
            bell = self._bell.listen()    # listening before reading: a commit in between still rings
            try:
                deliveries, scanned = await asyncio.to_thread(self._page, cursor)
                for delivery in deliveries:
                    yield delivery
                cursor = max(cursor, scanned)
                if len(deliveries) < PAGE:
                    await bell.wait()
            finally:
                self._bell.forget(bell)

    def first_deliveries(self, kind: str, after: int, limit: int = PAGE) -> list[actions_pb2.VehicleAction]:
        """First deliveries of `kind` after cursor `after`, in order, whatever happened since (the MQTT outbox
        reads owner notifications this way: each is published once, even if it was acknowledged meanwhile)."""
        rows = self.db.connect().execute(
            f"{DELIVERY_SELECT} WHERE d.cursor > ? AND a.kind = ? AND d.attempt = 1 AND d.state = ? "
            "ORDER BY d.cursor LIMIT ?", (after, kind_name(kind), PENDING, limit)).fetchall()
        return [delivery_from_row(r) for r in rows]

    def latest_cursor(self) -> int:
        row = self.db.connect().execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM action_deliveries").fetchone()
        return int(row["c"])

    # ------------------------------------------------------------------ shared with the escalator
    def _deliver(self, tx, action_id: str, state: int, attempt: int, priority: int, escalation: int,
                 now: float) -> int:
        cur = tx.execute("INSERT INTO action_deliveries(action_id, time, state, attempt, priority, escalation) "
                         "VALUES(?, ?, ?, ?, ?, ?)", (action_id, now, state, attempt, priority, escalation))
        cursor = cur.lastrowid
        retain = self.config.retain_deliveries
        if cursor > retain and cursor % 256 == 0:
            # Only finished actions' old deliveries go; anything still to do keeps its latest.
            tx.execute("DELETE FROM action_deliveries WHERE cursor <= ? AND action_id IN "
                       "(SELECT id FROM actions WHERE state != ?)", (cursor - retain, PENDING))
        return cursor

    def _committed(self, delivery: actions_pb2.VehicleAction) -> None:
        self._bell.ring()
        for callback in self._listeners:
            try:
                callback(delivery)
            except Exception as exc:   # a listener must not undo a committed action
                log.error("action.listener_failed", error=repr(exc))

    @staticmethod
    def _row(conn, action_id: str):
        row = conn.execute(f"{DELIVERY_SELECT} WHERE a.id = ? AND {LATEST}", (action_id,)).fetchone()
        if row is None:
            raise ActionNotFound(f"id: no action {action_id!r}")
        return row

    def _page(self, cursor: int) -> tuple[list[actions_pb2.VehicleAction], int]:
        conn = self.db.connect()
        now = self.clock()
        conn.execute("BEGIN")
        try:
            rows = conn.execute(
                f"{DELIVERY_SELECT} WHERE d.cursor > ? AND {LATEST} AND a.expires > ? "
                "AND (a.state = ? OR d.state = ?) ORDER BY d.cursor LIMIT ?",
                (cursor, now, PENDING, CANCELLED, PAGE)).fetchall()
            top = conn.execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM action_deliveries").fetchone()["c"]
        finally:
            conn.execute("COMMIT")
        scanned = rows[-1]["cursor"] if len(rows) == PAGE else max(top, cursor)
        return [delivery_from_row(r) for r in rows], scanned
