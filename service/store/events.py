"""The durable event log: an event is committed to SQLite before anyone sees it, then subscribers are woken.

Writes go through one writer thread in group commits: everything queued while the previous commit's fsync ran
is committed in the next transaction, so the event loop never waits for a disk and a burst of N events costs a
few fsyncs, not N. `append` returns at once with the event's cursor (allocated in order, so commits land in
cursor order); the event becomes visible to `after`, `follow` and `latest_cursor` only once it is committed.
`commit` lets a caller put its own statements in the same transaction as events (the vehicle state and the
transition events it causes) and wait for them.

Subscribers hold only a cursor. A caught-up subscriber reads new events from a short in-memory tail of
committed events; one that is behind reads from the database in pages, so a slow consumer costs no memory:
it falls behind on disk, never in a queue. A commit wakes only the subscribers whose kind filter it matches.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from incar.v1 import common_pb2
from service.store.db import Database

log = structlog.get_logger(__name__)

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
TAIL = 2048           # committed events kept in memory for caught-up subscribers
# Fault injection for crash tests: the process SIGKILLs itself right after committing a group that holds a job
# with this tag (e.g. "vehicle_state"), before anything is published or acknowledged.
FAULT_KILL_AFTER_COMMIT = "INCAR_FAULT_KILL_AFTER_COMMIT"

GROUP_SIZE = Histogram("incar_event_commit_group_size", "Jobs per group commit",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
SUBSCRIBER_WAKEUPS = Counter("incar_event_subscriber_wakeups_total", "Subscribers woken by a commit that matched "
                             "their kind filter")
SUBSCRIBER_READS = Counter("incar_event_subscriber_reads_total", "Pages read by subscribers, by source "
                           "(tail: memory, caught up; database: behind or starting)", ["source"])
COMMIT_FAILURES = Counter("incar_event_commit_failures_total", "Group commits that failed (disk full, read-only)")

Statement = tuple[str, tuple]


@dataclass
class _Job:
    events: list[common_pb2.Event]
    statements: list[Statement] = field(default_factory=list)
    future: Future | None = None
    tag: str = ""


@dataclass(eq=False)
class _Waiter:
    event: asyncio.Event
    prefixes: tuple[str, ...]   # lower-cased kind prefixes; empty: every kind

    def wants(self, kinds: set[str]) -> bool:
        return not self.prefixes or any(k.startswith(p) for k in kinds for p in self.prefixes)


class EventLog:
    def __init__(self, db: Database, *, retain: int = 100_000, clock=time.time):
        self.db = db
        self.retain = retain
        self.clock = clock
        db.register_migrations("events", MIGRATIONS)
        db.add_close_hook(self.close)
        self._lock = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._allocated: int | None = None     # last cursor handed out (None until the database is read)
        self._jobs_queued = 0
        self._jobs_done = 0                     # committed or refused, in queue order
        self._committed = 0                     # highest committed cursor
        self._tail: deque[common_pb2.Event] = deque()
        self._tail_floor = 0                    # the tail holds every committed event after this cursor
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._exit_hook = False
        self._waiters: dict[asyncio.AbstractEventLoop, set[_Waiter]] = {}

    # writing -------------------------------------------------------------------------------------------------
    def append(self, kind: str, skill: str, severity: int, message: str, payload: dict | None = None,
               camera_id: str = "", attachment_ids: Sequence[str] = ()) -> common_pb2.Event:
        """Queue an event for the next group commit; returns it with its cursor (never blocks on the disk)."""
        event = self.new_event(kind, skill, severity, message, payload, camera_id, attachment_ids)
        self._enqueue(_Job([event]))
        return event

    def new_event(self, kind: str, skill: str, severity: int, message: str, payload: dict | None = None,
                  camera_id: str = "", attachment_ids: Sequence[str] = ()) -> common_pb2.Event:
        """A validated event without a cursor, for `commit`."""
        if not kind or not skill:
            raise ValueError("an event needs a kind and a skill")
        if severity not in common_pb2.Severity.values():
            raise ValueError(f"severity {severity!r} is not a Severity value")
        payload_json = json.dumps(payload, sort_keys=True) if payload else ""
        return _event(0, self.clock(), kind, skill, severity, camera_id, message, payload_json, list(attachment_ids))

    def commit(self, statements: Sequence[Statement], events: Sequence[common_pb2.Event] = (),
               tag: str = "") -> Future:
        """Run `statements` and insert `events` in one transaction; the future's result is the events with their
        cursors once committed, or the StoreError that refused them."""
        future: Future = Future()
        self._enqueue(_Job(list(events), list(statements), future, tag))
        return future

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("the event log is closed")
            self._ensure_started()
            for event in job.events:
                self._allocated += 1
                event.cursor = self._allocated
            self._queue.append(job)
            self._jobs_queued += 1
            self._lock.notify_all()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything queued before this call has been committed (or refused)."""
        with self._lock:
            target = self._jobs_queued
            return self._lock.wait_for(lambda: self._jobs_done >= target, timeout)

    def close(self) -> None:
        """Commit what is queued, then stop the writer (the database's close hook)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(30)
        with self._lock:   # a later append starts a new writer (a database may be reopened)
            self._writer, self._stopping = None, False

    def _ensure_started(self) -> None:
        if self._allocated is None:
            conn = self.db.connect()
            top = conn.execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM events").fetchone()["c"]
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
            self._allocated = max(int(top), int(row["seq"]) if row else 0)
            self._committed = self._tail_floor = self._allocated
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="event-writer", daemon=True)
            self._writer.start()
            if not self._exit_hook:
                atexit.register(self.close)   # a short-lived tool's last events are committed before it exits
                self._exit_hook = True

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                jobs = list(self._queue)
                self._queue.clear()
            try:
                self._write(jobs)
            finally:
                with self._lock:
                    self._jobs_done += len(jobs)
                    self._lock.notify_all()

    def _write(self, jobs: list[_Job]) -> None:
        GROUP_SIZE.observe(len(jobs))
        try:
            self._insert(jobs)
        except sqlite3.IntegrityError:
            # Another process appended to the same database (a maintenance tool): take cursors after its rows.
            self._renumber(jobs)
            try:
                self._insert(jobs)
            except Exception as exc:
                self._failed(jobs, exc)
                return
        except Exception as exc:
            self._failed(jobs, exc)
            return
        fault = os.environ.get(FAULT_KILL_AFTER_COMMIT)
        if fault and any(job.tag == fault for job in jobs):
            os.kill(os.getpid(), signal.SIGKILL)
        self._publish(jobs)

    def _insert(self, jobs: list[_Job]) -> None:
        with self.db.transaction() as tx:
            for job in jobs:
                for sql, params in job.statements:
                    tx.execute(sql, params)
                for event in job.events:
                    tx.execute(
                        "INSERT INTO events(cursor, time, kind, skill, severity, camera_id, message, payload_json,"
                        " attachments_json) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (event.cursor, event.time.ToNanoseconds() / 1e9, event.kind, event.skill, event.severity,
                         event.camera_id, event.message, event.payload_json, json.dumps(list(event.attachment_ids))))
            top = max((e.cursor for job in jobs for e in job.events), default=0)
            if self.retain and top > self.retain and (top // 64) != ((top - len(jobs)) // 64):
                tx.execute("DELETE FROM events WHERE cursor <= ?", (top - self.retain,))

    def _renumber(self, jobs: list[_Job]) -> None:
        top = self.db.connect().execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM events").fetchone()["c"]
        with self._lock:
            self._allocated = max(self._allocated, int(top))
            for job in jobs:
                for event in job.events:
                    self._allocated += 1
                    event.cursor = self._allocated
            for job in self._queue:     # queued meanwhile: keep commit order = cursor order
                for event in job.events:
                    self._allocated += 1
                    event.cursor = self._allocated
            self._committed = self._tail_floor = max(self._committed, int(top))
        log.warning("events.renumbered", reason="another writer appended to the database")

    def _failed(self, jobs: list[_Job], exc: Exception) -> None:
        COMMIT_FAILURES.inc()
        log.error("events.commit_failed", jobs=len(jobs), error=str(exc))
        for job in jobs:
            if job.future is not None:
                job.future.set_exception(exc)

    def _publish(self, jobs: list[_Job]) -> None:
        events = [e for job in jobs for e in job.events]
        with self._lock:
            for event in events:
                self._tail.append(event)
                self._committed = max(self._committed, event.cursor)
            while len(self._tail) > TAIL:
                self._tail_floor = self._tail.popleft().cursor
        for job in jobs:
            if job.future is not None:
                job.future.set_result(job.events)
        if events:
            self._wake({e.kind.lower() for e in events})

    # reading -------------------------------------------------------------------------------------------------
    def after(self, cursor: int, limit: int = 100, kinds: Iterable[str] = ()) -> list[common_pb2.Event]:
        self.flush()   # read-your-writes: what this process appended before the call is there
        rows = self._rows(cursor, limit, list(kinds))
        return [_from_row(r) for r in rows]

    def latest_cursor(self) -> int:
        """The newest committed cursor (also one another process committed to the same database)."""
        row = self.db.connect().execute("SELECT COALESCE(MAX(cursor), 0) AS c FROM events").fetchone()
        with self._lock:
            return max(int(row["c"]), self._committed)

    async def follow(self, after: int, kinds: Sequence[str] = ()) -> AsyncIterator[common_pb2.Event]:
        """Every event after `after`, then live ones, forever (until the caller stops iterating)."""
        loop = asyncio.get_running_loop()
        cursor, kinds = after, list(kinds)
        prefixes = tuple(k.lower() for k in kinds)
        first = True   # the first page always comes from the database (it sees every writer's rows)
        while True:
            waiter = _Waiter(asyncio.Event(), prefixes)
            self._register(loop, waiter)       # registered before reading: no lost wake-up
            try:
                page = None if first else self._from_tail(cursor, prefixes)
                behind, first = page is None, False
                SUBSCRIBER_READS.labels("database" if behind else "tail").inc()
                if behind:
                    page = await asyncio.to_thread(self._rows, cursor, PAGE, kinds, True)
                events, scanned = page
                for event in events:
                    yield event
                cursor = max(cursor, scanned)
                if not behind or len(events) < PAGE:
                    await waiter.event.wait()
            finally:
                self._unregister(loop, waiter)

    def _from_tail(self, cursor: int, prefixes: tuple[str, ...]):
        """(events, scanned) from memory when the tail covers everything after `cursor`, else None."""
        with self._lock:
            if self._allocated is None or cursor < self._tail_floor:
                return None
            events = [e for e in self._tail if e.cursor > cursor
                      and (not prefixes or any(e.kind.lower().startswith(p) for p in prefixes))]
            return events, max(cursor, self._committed)

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

    # fan-out -------------------------------------------------------------------------------------------------
    def _register(self, loop: asyncio.AbstractEventLoop, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.setdefault(loop, set()).add(waiter)

    def _unregister(self, loop: asyncio.AbstractEventLoop, waiter: _Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(loop)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[loop]

    def _wake(self, kinds: set[str]) -> None:
        """One hop per event loop, and only the subscribers whose filter matches a committed kind."""
        with self._lock:
            due = [(loop, [w.event for w in waiters if w.wants(kinds)]) for loop, waiters in self._waiters.items()]
        for loop, events in due:
            if not events:
                continue
            SUBSCRIBER_WAKEUPS.inc(len(events))
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed; its subscribers are gone
                pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


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
