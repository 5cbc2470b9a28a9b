"""AI Sentinel: parked-car surveillance. Disarmed -> Standby -> Alert -> Alarm -> (cool-down) -> Standby.

Armed when locked and parked (unless configured off), never at a saved place (home, work) and never below the
battery floor. Alert: a person lingers near the car for `linger_seconds`, or touches it. Alarm: a person at a door
handle, or motion at a window with a person there. Every condition must hold on `confirm_frames` consecutive
frames of one camera (one-frame detector glitches do not wake the owner), and masked regions are ignored.
On Alert and Alarm: a clip from the camera ring buffer starting `pre_event_seconds` before the event, a snapshot,
and a description worded by the model; then one durable event that links them.
"""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import structlog

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service.perception.types import FrameAnalysis
from service.runtime.scheduler import JobClass
from skills.base import (PreconditionError, NotFoundError, Skill, SkillContext, area, centre, inside, is_moving,
                         narrate, overlap, to_pixels)
from skills.config import SentinelConfig

log = structlog.get_logger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE sentinel_clips (
        clip_id TEXT PRIMARY KEY,
        camera_id TEXT NOT NULL,
        event_cursor INTEGER NOT NULL DEFAULT 0,
        level TEXT NOT NULL,
        start_time REAL NOT NULL,
        event_time REAL NOT NULL,
        frame_count INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        format TEXT NOT NULL,
        path TEXT NOT NULL,
        snapshot_id TEXT NOT NULL DEFAULT '',
        snapshot_path TEXT NOT NULL DEFAULT '',
        description TEXT NOT NULL DEFAULT '',
        false_positive INTEGER NOT NULL DEFAULT 0,
        note TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sentinel_clips_time ON sentinel_clips(event_time);
    """,
]

EARTH_RADIUS_M = 6_371_008.8
STATE = skills_pb2.SentinelState
LEVEL_NAMES = {skills_pb2.SENTINEL_STATE_ALERT: "alert", skills_pb2.SENTINEL_STATE_ALARM: "alarm"}


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


@dataclass
class _CameraTrack:
    """Consecutive-frame counters of one camera (multi-frame confirmation)."""
    near: int = 0
    touch: int = 0
    handle: int = 0
    window: int = 0
    near_since: float | None = None


@dataclass
class _Observation:
    near: bool = False
    touch: bool = False
    handle: bool = False
    window: bool = False
    detail: list[str] = field(default_factory=list)


class Sentinel(Skill):
    name = "sentinel"

    def __init__(self, ctx: SkillContext, config: SentinelConfig | None = None):
        super().__init__(ctx)
        self.config = config or SentinelConfig()
        self.budget_s = self.config.budget_seconds
        ctx.db.register_migrations("sentinel", MIGRATIONS)
        self.clip_dir = Path(ctx.data_dir) / "sentinel" / "clips"
        self.snapshot_dir = Path(ctx.data_dir) / "sentinel" / "snapshots"
        self.state = skills_pb2.SENTINEL_STATE_DISARMED
        self.armed = False
        self.reason = "not locked and parked"
        self.since = ctx.clock()
        self._requested: bool | None = None   # True: armed by request; False: disarmed by request (until unlock)
        self._tracks: dict[str, _CameraTrack] = {}
        self._last_activity = 0.0

    # ------------------------------------------------------------------ arming
    def arm(self) -> skills_pb2.SentinelStatus:
        if is_moving(self.vehicle):
            raise PreconditionError("cannot arm Sentinel while driving (gear D/R or moving)")
        floor = self.config.battery_floor_percent
        if self.vehicle.battery_percent < floor:
            raise PreconditionError(f"cannot arm Sentinel: battery {self.vehicle.battery_percent:.0f}% "
                                    f"is below the {floor:.0f}% floor")
        self._requested = True
        self._evaluate_arming()
        return self.status()

    def disarm(self) -> skills_pb2.SentinelStatus:
        self._requested = False
        self._evaluate_arming()
        return self.status()

    def status(self) -> skills_pb2.SentinelStatus:
        out = skills_pb2.SentinelStatus(state=self.state, armed=self.armed, reason=self.reason)
        out.since.FromNanoseconds(int(self.since * 1e9))
        return out

    def _arming_decision(self) -> tuple[bool, str]:
        v, cfg = self.vehicle, self.config
        if is_moving(v):
            return False, "driving"
        if v.battery_percent < cfg.battery_floor_percent:
            return False, f"battery {v.battery_percent:.0f}% below the {cfg.battery_floor_percent:.0f}% floor"
        if self._requested is True:
            return True, "armed by request"
        if self._requested is False:
            return False, "disarmed by request"
        if not cfg.auto_arm:
            return False, "automatic arming is off"
        if not (v.locked and v.gear == vehicle_pb2.GEAR_PARK):
            return False, "not locked and parked"
        place = self._saved_place_here()
        if place:
            return False, f"at saved place {place!r}"
        return True, "locked and parked"

    def _saved_place_here(self) -> str:
        if not self.vehicle.gps_valid:
            return ""
        gps = self.vehicle.gps
        for place in self.config.saved_places:
            if haversine_m(gps.latitude_deg, gps.longitude_deg, place.latitude_deg,
                           place.longitude_deg) <= self.config.saved_place_radius_m:
                return place.name
        return ""

    def _evaluate_arming(self) -> None:
        armed, reason = self._arming_decision()
        was = self.armed
        self.armed, self.reason = armed, reason
        if armed and not was:
            self._tracks.clear()
            self._set_state(skills_pb2.SENTINEL_STATE_STANDBY)
            self.emit("armed", common_pb2.SEVERITY_INFO, f"Sentinel armed: {reason}", {"reason": reason})
        elif not armed and was:
            self._set_state(skills_pb2.SENTINEL_STATE_DISARMED)
            self.emit("disarmed", common_pb2.SEVERITY_INFO, f"Sentinel disarmed: {reason}", {"reason": reason})

    def _set_state(self, state: int) -> None:
        if state != self.state:
            log.info("sentinel.state", state=STATE.Name(state), previous=STATE.Name(self.state))
            self.state, self.since = state, self.now

    async def on_vehicle(self, previous, current) -> None:
        if previous.locked and not current.locked:
            self._requested = None     # the owner is back: a request lasts one locked period
        self._evaluate_arming()

    # ------------------------------------------------------------------ watching
    async def on_frame(self, analysis: FrameAnalysis) -> None:
        if not self.armed or analysis.role != "exterior":
            return
        with self.measure():
            level, why = self._decide(analysis)
        if level is not None:
            previous = self.state
            self._set_state(level)
            # Take the ring's frames now (references, cheap): the clip is the footage up to this decision.
            images = self._pre_event_images(analysis)
            self.spawn(self._record(level, previous, analysis, why, images))

    def _decide(self, analysis: FrameAnalysis) -> tuple[int | None, str]:
        """Update the confirmation counters with one frame; returns a new (higher) state and why, or None."""
        obs = self._observe(analysis)
        track = self._tracks.setdefault(analysis.camera_id, _CameraTrack())
        now = analysis.timestamp
        track.near = track.near + 1 if obs.near else 0
        track.touch = track.touch + 1 if obs.touch else 0
        track.handle = track.handle + 1 if obs.handle else 0
        track.window = track.window + 1 if obs.window else 0
        if not obs.near:
            track.near_since = None
        elif track.near_since is None:
            track.near_since = now
        if obs.near or obs.handle or obs.window:
            self._last_activity = self.now
        need = self.config.confirm_frames
        if track.handle >= need or track.window >= need:
            level = skills_pb2.SENTINEL_STATE_ALARM
            why = "a person at a door handle" if track.handle >= need else "motion at a window with a person there"
        elif track.touch >= need:
            level, why = skills_pb2.SENTINEL_STATE_ALERT, "a person touching the car"
        elif (track.near >= need and track.near_since is not None
              and now - track.near_since >= self.config.linger_seconds):
            level = skills_pb2.SENTINEL_STATE_ALERT
            why = f"a person lingering near the car for {now - track.near_since:.0f} s"
        else:
            return None, ""
        return (level, why) if level > self.state else (None, "")

    def _observe(self, analysis: FrameAnalysis) -> _Observation:
        cfg, frame = self.config, analysis.frame
        height = frame.shape[0]
        masks = [to_pixels(b, frame) for b in cfg.masks.get(analysis.position, [])]
        handles = [to_pixels(b, frame) for b in cfg.door_handle_zones.get(analysis.position, [])]
        windows = [to_pixels(b, frame) for b in cfg.window_zones.get(analysis.position, [])]
        obs = _Observation()
        people = [d for d in analysis.detections if d.label == "person" and d.score >= cfg.person_min_score
                  and not any(inside(centre(d.box), m) for m in masks)]
        for person in people:
            tall = (person.box[3] - person.box[1]) / height
            obs.near |= tall >= cfg.near_height_fraction
            obs.touch |= tall >= cfg.touch_height_fraction
            obs.handle |= any(overlap(person.box, z) >= cfg.handle_zone_coverage * area(z) for z in handles)
        if people and analysis.motion is not None and windows:
            regions = [r for r in analysis.motion.regions if not any(inside(centre(r), m) for m in masks)]
            for zone in windows:
                moved = min(1.0, sum(overlap(r, zone) for r in regions) / max(area(zone), 1.0))
                obs.window |= moved >= cfg.window_motion_fraction
        return obs

    async def tick(self) -> None:
        if self.state in (skills_pb2.SENTINEL_STATE_ALERT, skills_pb2.SENTINEL_STATE_ALARM) and \
                self.now - self._last_activity >= self.config.cooldown_seconds:
            self._tracks.clear()
            self._set_state(skills_pb2.SENTINEL_STATE_STANDBY)
            self.emit("standby", common_pb2.SEVERITY_INFO,
                      f"Sentinel back to standby after {self.config.cooldown_seconds:.0f} s without activity")

    # ------------------------------------------------------------------ evidence
    def _pre_event_images(self, analysis: FrameAnalysis) -> list[tuple[float, np.ndarray]]:
        event_time, pre = analysis.timestamp, self.config.pre_event_seconds
        frames = []
        if self.ctx.frames is not None:
            frames = [f for f in self.ctx.frames.history(analysis.camera_id, pre + 1.0)
                      if event_time - pre <= f.capture_time <= event_time]
        return [(f.capture_time, f.original) for f in frames] or [(event_time, analysis.frame)]

    async def _record(self, level: int, previous: int, analysis: FrameAnalysis, why: str,
                      images: list[tuple[float, np.ndarray]]) -> None:
        name = LEVEL_NAMES[level]
        event_time = analysis.timestamp
        snapshot = images[-1][1]
        clip_id, snapshot_id = f"clip-{uuid.uuid4().hex[:16]}", f"snap-{uuid.uuid4().hex[:16]}"
        clip = await asyncio.to_thread(self._write_clip, clip_id, snapshot_id, images, snapshot)
        description = await narrate(
            self.ctx.narrator, task="You watch a parked car and tell its owner what the camera saw.",
            draft=f"Sentinel {name} on the {analysis.position} camera: {why}.", priority=JobClass.ALERT,
            images=(snapshot,))
        with self.ctx.db.transaction() as tx:
            tx.execute("INSERT INTO sentinel_clips(clip_id, camera_id, level, start_time, event_time, frame_count,"
                       " size_bytes, format, path, snapshot_id, snapshot_path, description)"
                       " VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                       (clip_id, analysis.camera_id, name, images[0][0], event_time, clip["frames"], clip["bytes"],
                        clip["format"], clip["path"], snapshot_id, clip["snapshot"], description))
        severity = common_pb2.SEVERITY_CRITICAL if level == skills_pb2.SENTINEL_STATE_ALARM \
            else common_pb2.SEVERITY_WARNING
        event = self.emit(name, severity, description,
                          {"reason": why, "clip_id": clip_id, "snapshot_id": snapshot_id,
                           "previous_state": STATE.Name(previous), "frames_before_event":
                               sum(1 for t, _ in images if t < event_time)},
                          camera_id=analysis.camera_id, attachment_ids=(clip_id, snapshot_id))
        with self.ctx.db.transaction() as tx:
            tx.execute("UPDATE sentinel_clips SET event_cursor=? WHERE clip_id=?", (event.cursor, clip_id))
        await asyncio.to_thread(self.enforce_retention)

    def _write_clip(self, clip_id: str, snapshot_id: str, images, snapshot: np.ndarray) -> dict:
        cfg = self.config
        self.clip_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        snapshot_path = self.snapshot_dir / f"{snapshot_id}.jpg"
        _write_jpeg(snapshot_path, snapshot, cfg.jpeg_quality)
        if cfg.clip_format == "mp4":
            path = self.clip_dir / f"{clip_id}.mp4"
            if _write_mp4(path, [img for _, img in images], cfg.clip_fps):
                return {"frames": len(images), "bytes": path.stat().st_size, "format": "mp4", "path": str(path),
                        "snapshot": str(snapshot_path)}
            log.warning("sentinel.mp4_unavailable", clip_id=clip_id, fallback="jpeg-sequence")
        folder = self.clip_dir / clip_id
        folder.mkdir()
        index = []
        for i, (t, img) in enumerate(images):
            name = f"{i:06d}.jpg"
            _write_jpeg(folder / name, img, cfg.jpeg_quality)
            index.append({"file": name, "capture_time": t})
        (folder / "index.json").write_text(json.dumps(index))
        size = sum(p.stat().st_size for p in folder.iterdir())
        return {"frames": len(images), "bytes": size, "format": "jpeg-sequence", "path": str(folder),
                "snapshot": str(snapshot_path)}

    def enforce_retention(self) -> list[str]:
        """Drop clips older than the age limit, then the oldest until the total fits the size limit."""
        cfg = self.config
        conn = self.ctx.db.connect()
        rows = conn.execute("SELECT clip_id, event_time, size_bytes FROM sentinel_clips "
                            "ORDER BY event_time DESC").fetchall()
        keep_bytes, doomed = 0, []
        for i, row in enumerate(rows):
            too_old = self.now - row["event_time"] > cfg.clip_max_age_seconds
            # The newest clip stays even alone over the size limit: it is the evidence of what just happened.
            if too_old or (i > 0 and keep_bytes + row["size_bytes"] > cfg.clip_max_total_bytes):
                doomed.append(row["clip_id"])
            else:
                keep_bytes += row["size_bytes"]
        for clip_id in doomed:
            self.delete_clip(clip_id)
        if doomed:
            log.info("sentinel.retention", deleted=len(doomed), kept_bytes=keep_bytes)
        return doomed

    def delete_clip(self, clip_id: str) -> None:
        row = self._clip_row(clip_id)
        for path in (Path(row["path"]), Path(row["snapshot_path"]) if row["snapshot_path"] else None):
            if path is None:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        with self.ctx.db.transaction() as tx:
            tx.execute("DELETE FROM sentinel_clips WHERE clip_id=?", (clip_id,))

    # ------------------------------------------------------------------ clip queries
    def _clip_row(self, clip_id: str):
        row = self.ctx.db.connect().execute("SELECT * FROM sentinel_clips WHERE clip_id=?", (clip_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no clip {clip_id!r}")
        return row

    def list_clips(self, limit: int = 0) -> list[skills_pb2.Clip]:
        rows = self.ctx.db.connect().execute("SELECT * FROM sentinel_clips ORDER BY event_time DESC LIMIT ?",
                                             (limit or -1,)).fetchall()
        return [_clip_message(r) for r in rows]

    def get_clip(self, clip_id: str) -> skills_pb2.Clip:
        return _clip_message(self._clip_row(clip_id))

    def clip_files(self, clip_id: str) -> list[Path]:
        row = self._clip_row(clip_id)
        path = Path(row["path"])
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        if not all(p.exists() for p in files):
            raise NotFoundError(f"clip {clip_id!r}: files are gone from {path}")
        return files

    def label_false_positive(self, clip_id: str, note: str = "") -> None:
        row = self._clip_row(clip_id)
        with self.ctx.db.transaction() as tx:
            tx.execute("UPDATE sentinel_clips SET false_positive=1, note=? WHERE clip_id=?", (note, clip_id))
        self.emit("false_positive", common_pb2.SEVERITY_INFO, f"Clip {clip_id} labelled a false positive",
                  {"clip_id": clip_id, "note": note, "event_cursor": row["event_cursor"]},
                  camera_id=row["camera_id"])


def _clip_message(row) -> skills_pb2.Clip:
    clip = skills_pb2.Clip(clip_id=row["clip_id"], event_cursor=row["event_cursor"], camera_id=row["camera_id"],
                           frame_count=row["frame_count"], size_bytes=row["size_bytes"], format=row["format"],
                           description=row["description"], false_positive=bool(row["false_positive"]))
    clip.start_time.FromNanoseconds(int(row["start_time"] * 1e9))
    clip.event_time.FromNanoseconds(int(row["event_time"] * 1e9))
    return clip


def _write_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path.name}")
    path.write_bytes(data.tobytes())


def _write_mp4(path: Path, images: list[np.ndarray], fps: float) -> bool:
    h, w = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        return False
    try:
        for img in images:
            writer.write(img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h)))
    finally:
        writer.release()
    return path.exists() and path.stat().st_size > 0
