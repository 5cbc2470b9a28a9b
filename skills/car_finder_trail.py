"""Car Finder's trail: the signs read on the way in (a garage's level and row signs pass the cameras while the
car drives to its bay), so a bay whose own sign is unreadable still gives the level and row.

Every exterior analysis that ran the text stage while the car moves adds its parsed readings (time, camera,
text, level/row/bay). At parking the record takes the level from the bay's own signs when they show one, else
the trail's last level; the row likewise, but only a row read after that level (rows belong to a level); never a
bay from the trail (passing bay numbers are other people's). The trail is stored with the record.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from incar.v1 import skills_pb2
from service.perception.types import FrameAnalysis

MIGRATION = """
    CREATE TABLE car_finder_trail (
        record_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        time REAL NOT NULL,
        camera_id TEXT NOT NULL,
        text TEXT NOT NULL,
        level TEXT NOT NULL DEFAULT '',
        row_name TEXT NOT NULL DEFAULT '',
        bay TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (record_id, seq)
    );
    ALTER TABLE car_finder_parking ADD COLUMN level_source TEXT NOT NULL DEFAULT '';
    ALTER TABLE car_finder_parking ADD COLUMN row_source TEXT NOT NULL DEFAULT '';
    """


@dataclass(frozen=True)
class Reading:
    time: float
    camera_id: str
    text: str
    level: str = ""
    row: str = ""
    bay: str = ""


class SignTrail:
    def __init__(self, seconds: float, max_readings: int, min_score: float):
        self.seconds, self.min_score = seconds, min_score
        self._readings: deque[Reading] = deque(maxlen=max_readings)

    def observe(self, analysis: FrameAnalysis, parse) -> Reading | None:
        """Add the signs of one analysed frame as one reading, when they name a level, row or bay."""
        texts = [line.text for line in analysis.texts if line.score >= self.min_score]
        if not texts:
            return None
        # OCR splits a plate into lines ("ROW", "D"): read them one by one and as one text.
        joined = " ".join(texts)
        fields = parse(texts)
        for key, value in parse([joined]).items():
            fields[key] = fields[key] or value
        if not any(fields.values()):
            return None
        last = self._readings[-1] if self._readings else None
        if last is not None and last.text == joined and analysis.timestamp - last.time < 2.0:
            return None    # the same sign on consecutive frames: one reading
        reading = Reading(analysis.timestamp, analysis.camera_id, joined, **fields)
        self._readings.append(reading)
        return reading

    def recent(self, now: float) -> list[Reading]:
        return [r for r in self._readings if now - r.time <= self.seconds]

    def clear(self) -> None:
        self._readings.clear()


def resolve(parked: dict[str, str], trail: list[Reading]) -> tuple[dict[str, str], dict[str, str]]:
    """The record's level/row/bay and where each came from ("parked", "trail" or "")."""
    out, source = dict(parked), {k: "parked" if v else "" for k, v in parked.items()}
    level_at = None
    if not out["level"]:
        for i in range(len(trail) - 1, -1, -1):
            if trail[i].level:
                out["level"], source["level"], level_at = trail[i].level, "trail", i
                break
    if not out["row"]:
        start = level_at if level_at is not None else _last_level_index(trail)
        for reading in reversed(trail[start or 0:]):
            if reading.row:
                out["row"], source["row"] = reading.row, "trail"
                break
    return out, source


def _last_level_index(trail: list[Reading]) -> int | None:
    for i in range(len(trail) - 1, -1, -1):
        if trail[i].level:
            return i
    return None


def store(tx, record_id: str, trail: list[Reading]) -> None:
    for seq, r in enumerate(trail):
        tx.execute("INSERT INTO car_finder_trail(record_id, seq, time, camera_id, text, level, row_name, bay)"
                   " VALUES(?,?,?,?,?,?,?,?)", (record_id, seq, r.time, r.camera_id, r.text, r.level, r.row, r.bay))


def load(conn, record_id: str) -> list[skills_pb2.SignReading]:
    rows = conn.execute("SELECT * FROM car_finder_trail WHERE record_id=? ORDER BY seq", (record_id,)).fetchall()
    out = []
    for row in rows:
        reading = skills_pb2.SignReading(camera_id=row["camera_id"], text=row["text"], level=row["level"],
                                         row=row["row_name"], bay=row["bay"])
        reading.time.FromNanoseconds(int(row["time"] * 1e9))
        out.append(reading)
    return out
