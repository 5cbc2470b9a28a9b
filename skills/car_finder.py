"""Car Finder: remember where the car was parked and say it back in words.

While driving it keeps the trail of level and row signs the exterior cameras read (skills/car_finder_trail.py).
On parking (gear P and ignition off) it reads the signs the cameras see at the bay (OCR) and stores level, row
and bay (the trail fills a level or row the bay does not show), GPS (when valid: garages have none), the time,
the trail and a snapshot; both download over the API. "Where is my car?" is answered by the model from the
stored record: level, row/bay, how long ago, and GPS when valid; the answer always carries the level and bay,
appended if the model's wording dropped them.
"""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import cv2
import structlog

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service.perception.types import FrameAnalysis, TextLine
from service.runtime.scheduler import JobClass
from skills.base import (NotFoundError, PreconditionError, SignReader, Skill, SkillContext, is_moving,
                         is_parked_off, narrate)
from skills.car_finder_trail import MIGRATION as TRAIL_MIGRATION
from skills.car_finder_trail import SignTrail, load as load_trail, resolve, store as store_trail
from skills.config import CarFinderConfig

log = structlog.get_logger(__name__)

# A view whose analysis is older than the camera's newest frame by this much is read again from that frame.
STALE_VIEW_S = 1.0
MIGRATIONS = [
    """
    CREATE TABLE car_finder_parking (
        record_id TEXT PRIMARY KEY,
        time REAL NOT NULL,
        gps_valid INTEGER NOT NULL,
        latitude_deg REAL, longitude_deg REAL, altitude_m REAL, accuracy_m REAL,
        level TEXT NOT NULL DEFAULT '',
        row_name TEXT NOT NULL DEFAULT '',
        bay TEXT NOT NULL DEFAULT '',
        sign_text TEXT NOT NULL DEFAULT '[]',
        snapshot_id TEXT NOT NULL DEFAULT '',
        snapshot_path TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX car_finder_parking_time ON car_finder_parking(time);
    """,
    TRAIL_MIGRATION,
]

_ID = r"([A-Z]{0,2}-?\d{1,4}[A-Z]?|[A-Z]{1,2})\b"
PATTERNS = {
    "level": [re.compile(r"\b([PBU]-?\d{1,2})\b(?!-\d)"),     # a garage level code wins: "P2", "B1"
              re.compile(r"\b(?:LEVEL|LVL|FLOOR|DECK|ETAGE|EBENE|NIVEAU)\s*[:#.]?\s*" + _ID + r"(?!-\d)")],
    "row": [re.compile(r"\b(?:ROW|AISLE|REIHE|ZONE|SECTION)\s*[:#.]?\s*" + _ID)],
    "bay": [re.compile(r"\b(?:BAY|SPACE|SPOT|STALL|PLATZ|SLOT)\s*[:#.]?\s*(?:NO\.?\s*)?(\d{1,4}[A-Z]?)\b")],
}
_LEVEL_ALONE = re.compile(r"^\s*([PBLU]-?\d{1,2})\s*$")    # a bare "P2" / "B1" sign names the level


def parse_signs(lines: list[str]) -> dict[str, str]:
    """Level, row and bay from OCR lines ('LEVEL P2', 'ROW C', 'BAY 17'); missing ones are ''."""
    found = {"level": "", "row": "", "bay": ""}
    for raw in lines:
        text = re.sub(r"\s+", " ", raw.upper())
        for key, patterns in PATTERNS.items():
            if found[key]:
                continue
            for pattern in patterns:
                match = pattern.search(text)
                if match:
                    found[key] = match.group(1)
                    break
        if not found["level"]:
            alone = _LEVEL_ALONE.match(text)
            if alone:
                found["level"] = alone.group(1)
    if not all(found.values()) and lines:
        # Perception's parser knows the combined forms ("C-14" = row C, bay 14); it fills what ours missed.
        from service.perception.text import parse_parking_sign
        for key, value in parse_parking_sign(lines).items():
            if not found.get(key):
                found[key] = value
    return found


class CarFinder(Skill):
    name = "car_finder"

    def __init__(self, ctx: SkillContext, config: CarFinderConfig | None = None,
                 read_signs: SignReader | None = None):
        super().__init__(ctx)
        self.config = config or CarFinderConfig()
        self.read_signs = read_signs
        ctx.db.register_migrations("car_finder", MIGRATIONS)
        self.snapshot_dir = Path(ctx.data_dir) / "car_finder" / "snapshots"
        self._exterior: dict[str, FrameAnalysis] = {}   # latest analysis per exterior camera
        self.trail = SignTrail(self.config.trail_seconds, self.config.trail_max_readings, self.config.min_text_score)

    async def on_frame(self, analysis: FrameAnalysis) -> None:
        if analysis.role == "exterior":
            self._exterior[analysis.camera_id] = analysis
            if analysis.texts and not is_parked_off(self.vehicle):   # on the way in: keep the signs passed
                reading = self.trail.observe(analysis, parse_signs)
                if reading is not None:
                    log.info("car_finder.sign", camera_id=reading.camera_id, text=reading.text, level=reading.level,
                             row=reading.row, bay=reading.bay)

    async def on_vehicle(self, previous, current) -> None:
        if is_parked_off(current) and not is_parked_off(previous):
            self.spawn(self._record_quietly(current))

    async def _record_quietly(self, state: vehicle_pb2.VehicleState) -> None:
        try:
            await self.record_parking(state)
        except PreconditionError as exc:
            log.info("car_finder.not_recorded", reason=str(exc))

    async def record_parking(self, state: vehicle_pb2.VehicleState | None = None) -> skills_pb2.ParkingRecord:
        """Read the signs the exterior cameras see now and store them with the vehicle's position."""
        state = self.vehicle if state is None else state
        if is_moving(state):
            raise PreconditionError(f"cannot record parking while moving ({state.speed_kmh:.0f} km/h, "
                                    f"gear {vehicle_pb2.Gear.Name(state.gear)})")
        if state.gear != vehicle_pb2.GEAR_PARK:
            raise PreconditionError(f"cannot record parking: gear is {vehicle_pb2.Gear.Name(state.gear)}, "
                                    "not PARK")
        with self.measure():
            lines, snapshot = await asyncio.to_thread(self._read_all)
        trail = self.trail.recent(self.now)
        fields, sources = resolve(parse_signs([line.text for line in lines]), trail)
        record_id = f"park-{uuid.uuid4().hex[:16]}"
        snapshot_id, snapshot_path = "", ""
        if snapshot is not None:
            snapshot_id = f"snap-{uuid.uuid4().hex[:16]}"
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            path = self.snapshot_dir / f"{snapshot_id}.jpg"
            ok, data = cv2.imencode(".jpg", snapshot, [cv2.IMWRITE_JPEG_QUALITY, self.config.snapshot_quality])
            if ok:
                path.write_bytes(data.tobytes())
                snapshot_path = str(path)
            else:
                snapshot_id = ""
        gps = state.gps
        now = self.now
        texts = [line.text for line in lines]
        with self.ctx.db.transaction() as tx:
            tx.execute("INSERT INTO car_finder_parking(record_id, time, gps_valid, latitude_deg, longitude_deg,"
                       " altitude_m, accuracy_m, level, row_name, bay, sign_text, snapshot_id, snapshot_path)"
                       " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (record_id, now, int(state.gps_valid),
                        *((gps.latitude_deg, gps.longitude_deg, gps.altitude_m, gps.accuracy_m)
                          if state.gps_valid else (None, None, None, None)),
                        fields["level"], fields["row"], fields["bay"], json.dumps(texts), snapshot_id,
                        snapshot_path))
            tx.execute("UPDATE car_finder_parking SET level_source=?, row_source=? WHERE record_id=?",
                       (sources["level"], sources["row"], record_id))
            store_trail(tx, record_id, trail)
            old = tx.execute("SELECT record_id, snapshot_path FROM car_finder_parking ORDER BY time DESC "
                             "LIMIT -1 OFFSET ?", (self.config.history_limit,)).fetchall()
            for row in old:
                tx.execute("DELETE FROM car_finder_parking WHERE record_id=?", (row["record_id"],))
                tx.execute("DELETE FROM car_finder_trail WHERE record_id=?", (row["record_id"],))
        for row in old:
            if row["snapshot_path"]:
                Path(row["snapshot_path"]).unlink(missing_ok=True)
        self.trail.clear()
        record = self._record(record_id)
        self.emit("parked", common_pb2.SEVERITY_INFO, _spot_words(record) or "Parking position recorded",
                  {"record_id": record_id, "level": record.level, "row": record.row, "bay": record.bay,
                   "level_source": record.level_source, "row_source": record.row_source,
                   "trail_readings": len(record.trail), "gps_valid": record.gps_valid},
                  attachment_ids=(snapshot_id,) if snapshot_id else ())
        return record

    def _read_all(self) -> tuple[list[TextLine], object]:
        """OCR lines from every exterior camera's newest view (perception's text stage when it ran on it)."""
        lines: list[TextLine] = []
        snapshot, best = None, -1
        for analysis, frame in self._views():
            found = list(analysis.texts) if analysis is not None and ("text" in analysis.stages_run
                                                                      or analysis.texts) else []
            if not found and self.read_signs is not None:
                found = list(self.read_signs(frame))
            found = [t for t in found if t.score >= self.config.min_text_score]
            lines += found
            if len(found) > best:   # the snapshot is the view that shows the most signs
                snapshot, best = frame, len(found)
        return lines, snapshot

    def _views(self) -> list[tuple[FrameAnalysis | None, object]]:
        """Per exterior camera, its latest analysis and the frame to read: the camera's newer frame when the
        analysis lags behind it (on a busy host the car can park before its last frames were analysed; the
        record is of what the cameras see now), with no analysis when none came yet."""
        # Copies: this runs in a worker thread while the event loop adds cameras.
        analyses = dict(self._exterior)
        frames = self.ctx.frames
        ids = set(analyses) | set(frames.camera_ids() if frames is not None else ())
        views = []
        for camera_id in sorted(ids):
            analysis = analyses.get(camera_id)
            newest = frames.latest(camera_id) if frames is not None else None
            if newest is not None and newest.role != "exterior":
                continue
            if newest is not None and (analysis is None or newest.capture_time - analysis.timestamp > STALE_VIEW_S):
                views.append((None, newest.original))
            elif analysis is not None:
                views.append((analysis, analysis.frame))
        return views

    def _row(self, record_id: str = ""):
        conn = self.ctx.db.connect()
        row = conn.execute("SELECT * FROM car_finder_parking WHERE record_id=?", (record_id,)).fetchone() \
            if record_id else conn.execute("SELECT * FROM car_finder_parking ORDER BY time DESC LIMIT 1").fetchone()
        if row is None:
            raise NotFoundError(f"no parking record {record_id!r}" if record_id else "no parking position recorded yet")
        return row

    def _record(self, record_id: str = "") -> skills_pb2.ParkingRecord:
        return _record_message(self._row(record_id), self.ctx.db.connect())

    def get_record(self, record_id: str = "") -> skills_pb2.ParkingRecord:
        """One record with its sign trail ("" for the latest); NotFoundError when there is none."""
        return self._record(record_id)

    def snapshot_path(self, record_id: str = "") -> Path:
        row = self._row(record_id)
        path = Path(row["snapshot_path"]) if row["snapshot_path"] else None
        if path is None or not path.is_file():
            raise NotFoundError(f"parking record {row['record_id']!r} has no snapshot")
        return path

    def history(self, limit: int = 0) -> list[skills_pb2.ParkingRecord]:
        conn = self.ctx.db.connect()
        rows = conn.execute("SELECT * FROM car_finder_parking ORDER BY time DESC LIMIT ?", (limit or -1,)).fetchall()
        return [_record_message(r, conn) for r in rows]

    async def where_is_my_car(self, question: str = "") -> tuple[str, skills_pb2.ParkingRecord]:
        records = self.history(1)
        if not records:
            raise NotFoundError("no parking position recorded yet")
        record = records[0]
        with self.measure():
            age = max(0.0, self.now - record.time.ToNanoseconds() / 1e9)
            gps = f"GPS {record.gps.latitude_deg:.5f}, {record.gps.longitude_deg:.5f}" if record.gps_valid else ""
            draft = _spot_words(record) or (f"Your car is parked at {gps}" if gps else
                                            "I have no sign reading or GPS fix for where the car is parked")
            if record.level_source == "trail":
                draft += " (the level from the signs on the way in)"
            if gps and _spot_words(record):
                draft += f"; {gps}"
            elif not gps:
                draft += " (no GPS fix there, likely a covered garage)"
            draft += f"; parked {ago(age)}, at {_local_time(record.time.ToSeconds())}."
            answer = await narrate(self.ctx.narrator, priority=JobClass.LOOKUP, max_tokens=64, draft=draft,
                                   task=f"The driver asks: {question.strip() or 'Where is my car?'}")
            answer = ensure_facts(answer, record)
        return answer, record


def ensure_facts(answer: str, record: skills_pb2.ParkingRecord) -> str:
    """The user must get the level and bay even if the model's words dropped them."""
    missing = []
    for label, value in (("level", record.level), ("bay", record.bay)):
        if value and not re.search(rf"(?<![A-Z0-9]){re.escape(value)}(?![A-Z0-9])", answer, re.IGNORECASE):
            missing.append(f"{label} {value}")
    if missing:
        answer = f"{answer.rstrip()} ({', '.join(missing)})".strip()
    return answer


def _spot_words(record: skills_pb2.ParkingRecord) -> str:
    parts = [f"level {record.level}" if record.level else "", f"row {record.row}" if record.row else "",
             f"bay {record.bay}" if record.bay else ""]
    parts = [p for p in parts if p]
    return ("Your car is parked on " + ", ".join(parts)) if parts else ""


def ago(seconds: float) -> str:
    """'just now', '12 min ago', '2 h 5 min ago', '3 days ago'."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "just now"
    if minutes < 60:
        return f"{minutes} min ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min ago" if minutes else f"{hours} h ago"
    return f"{hours // 24} days ago"


def _local_time(epoch: float) -> str:
    import time as _time
    return _time.strftime("%Y-%m-%d %H:%M", _time.localtime(epoch))


def _record_message(row, conn=None) -> skills_pb2.ParkingRecord:
    record = skills_pb2.ParkingRecord(record_id=row["record_id"], gps_valid=bool(row["gps_valid"]),
                                      level=row["level"], row=row["row_name"], bay=row["bay"],
                                      sign_text=json.loads(row["sign_text"]), snapshot_id=row["snapshot_id"],
                                      level_source=row["level_source"], row_source=row["row_source"])
    if conn is not None:
        record.trail.extend(load_trail(conn, row["record_id"]))
    record.time.FromNanoseconds(int(row["time"] * 1e9))
    if row["gps_valid"]:
        record.gps.latitude_deg, record.gps.longitude_deg = row["latitude_deg"], row["longitude_deg"]
        record.gps.altitude_m, record.gps.accuracy_m = row["altitude_m"], row["accuracy_m"]
    return record
