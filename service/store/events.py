"""The durable event log: an event is committed to SQLite before anyone sees it, then subscribers are woken.

Subscribers hold only a cursor and read from the database in pages, so a slow consumer costs no memory:
it falls behind on disk, never in a queue (the policy for slow HMI clients).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from incar.v1 import common_pb2
from service.store.db import Database

MIGRATIONS = [
    """
    CREATE TABLE events (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        skill TEXT NOT NULL,
        severity INTEGER NOT NULL,
        camera_id TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        payload_json TEXT NOT NULL DEFAULT '',
        attachments_json TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX events_kind ON events(kind, cursor);
    """,
]

PAGE = 256


class EventLog:
    def __init__(self, db: Database, *, retain: int = 100_000, clock=time.time):
        self.db = db
        self.retain = retain
        self.clock = clock
        db.register_migrations("events", MIGRATIONS)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._waiters_lock = threading.Lock()
        self._listeners: list = []

    def on_append(self, callback) -> None:
        """Call `callback(event)` after each commit (metrics, logs); never used for delivery."""
        self._listeners.append(callback)

    def append(self, kind: str, skill: str, severity: int, message: str, payload: dict | None = None,
               camera_id: str = "", attachment_ids: Sequence[str] = ()) -> common_pb2.Event:
        if not kind or not skill:
            raise ValueError("an event needs a kind and a skill")
        if severity not in common_pb2.Severity.values():
            raise ValueError(f"severity {severity!r} is not a Severity value")
        now = self.clock()
        payload_json = json.dumps(payload, sort_keys=True) if payload else ""
        with self.db.transaction() as tx:
            cur = tx.execute(
                "INSERT INTO events(time, kind, skill, severity, camera_id, message, payload_json, attachments_json)"
                " VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                (now, kind, skill, int(severity), camera_id, message, payload_json, json.dumps(list(attachment_ids))))
            cursor = cur.lastrowid
            if self.retain and cursor > self.retain and cursor % 64 == 0:
                tx.execute("DELETE FROM events WHERE cursor <= ?", (cursor - self.retain,))
        event = _event(cursor, now, kind, skill, severity, camera_id, message, payload_json, list(attachment_ids))
        self._wake()
        for callback in self._listeners:
            callback(event)
        return event

    def after(self, cursor: int, limit: int = 100, kinds: Iterable[str] = ()) -> list[common_pb2.Event]:
        rows = self._rows(cursor, limit, list(kinds))
        return [_from_row(r) for r in rows]

    def latest_cursor(self) -> int:
        row = self.db.connect().execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM events").fetchone()
        return int(row["c"])

    async def follow(self, after: int, kinds: Sequence[str] = ()) -> AsyncIterator[common_pb2.Event]:
        """Every event after `after`, then live ones, forever (until the caller stops iterating)."""
        loop = asyncio.get_running_loop()
        cursor = after
        while True:
            waiter = (loop, asyncio.Event())
            with self._waiters_lock:
                self._waiters.add(waiter)       # registered before reading: no lost wake-up
            try:
                rows = await asyncio.to_thread(self._rows, cursor, PAGE, list(kinds), True)
                events, scanned = rows
                for event in events:
                    yield event
                cursor = max(cursor, scanned)
                if len(events) < PAGE:
                    await waiter[1].wait()
            finally:
                with self._waiters_lock:
                    self._waiters.discard(waiter)

    def _rows(self, cursor: int, limit: int, kinds: list[str], with_scanned: bool = False):
        conn = self.db.connect()
        where, params = "cursor > ?", [cursor]
        if kinds:
            where += " AND (" + " OR ".join("kind LIKE ? ESCAPE '\\'" for _ in kinds) + ")"
            params += [_like_prefix(k) for k in kinds]
        conn.execute("BEGIN")
        try:
            rows = conn.execute(f"SELECT * FROM events WHERE {where} ORDER BY cursor LIMIT ?",
                                (*params, limit)).fetchall()
            top = conn.execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM events").fetchone()["c"]
        finally:
            conn.execute("COMMIT")
        if not with_scanned:
            return rows
        scanned = rows[-1]["cursor"] if len(rows) == limit else max(top, cursor)
        return [_from_row(r) for r in rows], scanned

    def _wake(self) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its subscriber is gone
                pass


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _event(cursor, when, kind, skill, severity, camera_id, message, payload_json, attachments) -> common_pb2.Event:
    ts = Timestamp()
    ts.FromNanoseconds(int(when * 1e9))
    return common_pb2.Event(cursor=cursor, time=ts, kind=kind, skill=skill, severity=severity,
                            camera_id=camera_id, message=message, payload_json=payload_json,
                            attachment_ids=attachments)


def _from_row(row) -> common_pb2.Event:
    return _event(row["cursor"], row["time"], row["kind"], row["skill"], row["severity"], row["camera_id"],
                  row["message"], row["payload_json"], json.loads(row["attachments_json"]))
