"""Safety's durable state: what it is watching for and each active alert with its escalation level, in SQLite,
so a restart (kill -9 included) resumes the same alert at the same level and the next step still comes on time.

Each record is one JSON document under a name ("watch", "child", "items", "exit:<side>"); a write is one
transaction. Steps are taken in the order: emit the event, request its actions (idempotent by key), then save the
level. A crash between the two repeats the event at most once, never loses a step, never doubles an action.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from service.store.db import Database

MIGRATIONS = [
    """
    CREATE TABLE safety_state (
        name TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
]


@dataclass
class Watch:
    """Child presence monitoring: why it started and when."""
    reason: str                   # "locked" | "closed_with_occupant"
    since: float


@dataclass
class ChildAlert:
    """An occupant alert (a person, or only pets) and how far its escalation has gone."""
    kind: str                     # "child_left_behind" | "pet_left_behind"
    since: float                  # confirmation time: the ladder's t0
    camera_id: str
    occupants: list[dict]
    event_cursor: int = 0         # its first event: what Acknowledge names
    step: int = 0                 # ladder steps taken (0: none yet)
    notifications: int = 0        # owner notifications sent
    action_ids: list[str] = field(default_factory=list)


@dataclass
class ActiveAlert:
    """What Safety.GetStatus lists: one alert, whatever its kind."""
    kind: str
    since: float
    detail: str
    camera_id: str = ""
    event_cursor: int = 0
    escalation_level: int = 0
    action_ids: list[str] = field(default_factory=list)


class SafetyStore:
    def __init__(self, db: Database, clock):
        self.db, self.clock = db, clock
        db.register_migrations("safety", MIGRATIONS)

    def load(self, name: str) -> dict | None:
        row = self.db.connect().execute("SELECT doc FROM safety_state WHERE name = ?", (name,)).fetchone()
        return json.loads(row["doc"]) if row else None

    def names(self, prefix: str) -> list[str]:
        rows = self.db.connect().execute("SELECT name FROM safety_state WHERE name LIKE ? ORDER BY name",
                                         (prefix.replace("%", "") + "%",)).fetchall()
        return [r["name"] for r in rows]

    def save(self, name: str, doc) -> None:
        payload = json.dumps(asdict(doc) if hasattr(doc, "__dataclass_fields__") else doc, sort_keys=True)
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO safety_state(name, doc, updated) VALUES(?, ?, ?) ON CONFLICT(name) DO UPDATE "
                       "SET doc = excluded.doc, updated = excluded.updated", (name, payload, self.clock()))

    def delete(self, name: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM safety_state WHERE name = ?", (name,))

    def watch(self) -> Watch | None:
        doc = self.load("watch")
        return Watch(**doc) if doc else None

    def child(self) -> ChildAlert | None:
        doc = self.load("child")
        return ChildAlert(**doc) if doc else None
