"""Sentinel's evidence: clips with footage before and after an event from every exterior camera, a snapshot,
their rows in SQLite, retention, and the files a download streams.

A clip is begun when the event happens (row + snapshot, `complete` false) and finished once the post-event
footage exists: each camera's frames from `pre_event_seconds` before to `post_event_seconds` after, at the rate
the camera delivered them (the hub's recorder keeps them encoded; JPEG frames are stored byte for byte).
Layout: `<clip_dir>/<clip_id>/snapshot.jpg`, `<camera_id>/NNNNNN.jpg` + `<camera_id>/index.json`
(or `<camera_id>.mp4`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import structlog

from incar.v1 import skills_pb2
from skills.base import NotFoundError, PreconditionError
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
    """
    ALTER TABLE sentinel_clips ADD COLUMN cameras_json TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE sentinel_clips ADD COLUMN complete INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE sentinel_clips ADD COLUMN end_time REAL NOT NULL DEFAULT 0;
    ALTER TABLE sentinel_clips ADD COLUMN trigger TEXT NOT NULL DEFAULT '';
    ALTER TABLE sentinel_clips ADD COLUMN zone TEXT NOT NULL DEFAULT '';
    CREATE TABLE sentinel_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sentinel_zones (zone TEXT PRIMARY KEY, false_positives INTEGER NOT NULL DEFAULT 0);
    """,
]


@dataclass(frozen=True)
class Footage:
    """One frame of a camera's footage: the JPEG bytes as the camera sent them, or the decoded image."""
    capture_time: float
    jpeg: bytes = b""
    image: np.ndarray | None = None


def footage_of(item) -> Footage:
    """A recorder frame (`service.cameras.recorder.RecordedFrame`) or a ring frame (`CameraFrame`) as Footage."""
    if getattr(item, "is_jpeg", False):
        return Footage(item.capture_time, jpeg=item.data)
    image = item.bgr() if hasattr(item, "bgr") else item.original
    return Footage(item.capture_time, image=image)


class ClipStore:
    def __init__(self, db, data_dir: Path, config: SentinelConfig, clock):
        self.db, self.config, self.clock = db, config, clock
        self.clip_dir = Path(data_dir) / "sentinel" / "clips"
        db.register_migrations("sentinel", MIGRATIONS)

    # ------------------------------------------------------------------ writing
    def begin(self, clip_id: str, *, level: str, trigger: str, zone: str, camera_id: str, event_time: float,
              snapshot: np.ndarray, description: str) -> None:
        folder = self.clip_dir / clip_id
        folder.mkdir(parents=True, exist_ok=True)
        snapshot_path = folder / "snapshot.jpg"
        snapshot_path.write_bytes(_jpeg(snapshot, self.config.jpeg_quality))
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO sentinel_clips(clip_id, camera_id, level, start_time, event_time, end_time,"
                       " frame_count, size_bytes, format, path, snapshot_id, snapshot_path, description, complete,"
                       " trigger, zone) VALUES(?,?,?,?,?,?,0,?,?,?,?,?,?,0,?,?)",
                       (clip_id, camera_id, level, event_time - self.config.pre_event_seconds, event_time,
                        event_time + self.config.post_event_seconds, snapshot_path.stat().st_size,
                        "mp4" if self.config.clip_format == "mp4" else "jpeg-sequence", str(folder),
                        f"{clip_id}-snapshot", str(snapshot_path), description, trigger, zone))

    def set_event(self, clip_id: str, cursor: int) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE sentinel_clips SET event_cursor=? WHERE clip_id=?", (cursor, clip_id))

    def finish(self, clip_id: str, event_time: float, cameras: dict[str, tuple[str, list[Footage]]]) -> dict:
        """Write every camera's footage (blocking: run in a thread); returns the clip's summary."""
        folder = self.clip_dir / clip_id
        summary, frames_total = [], 0
        for camera_id, (position, footage) in sorted(cameras.items()):
            footage = sorted(footage, key=lambda f: f.capture_time)
            if not footage:
                continue
            if self.config.clip_format == "mp4" and self._write_mp4(folder / f"{camera_id}.mp4", footage):
                pass
            else:
                self._write_jpegs(folder / camera_id, footage)
            span = footage[-1].capture_time - footage[0].capture_time
            summary.append({"camera_id": camera_id, "position": position, "frame_count": len(footage),
                            "frames_before_event": sum(1 for f in footage if f.capture_time < event_time),
                            "fps": round((len(footage) - 1) / span, 3) if span > 0 else 0.0})
            frames_total += len(footage)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        times = [f.capture_time for _, fs in cameras.values() for f in fs]
        with self.db.transaction() as tx:
            tx.execute("UPDATE sentinel_clips SET frame_count=?, size_bytes=?, cameras_json=?, complete=1,"
                       " start_time=?, end_time=? WHERE clip_id=?",
                       (frames_total, size, json.dumps(summary), min(times, default=event_time),
                        max(times, default=event_time), clip_id))
        return {"frames": frames_total, "bytes": size, "cameras": summary}

    def _write_jpegs(self, folder: Path, footage: list[Footage]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        index = []
        for i, frame in enumerate(footage):
            name = f"{i:06d}.jpg"
            (folder / name).write_bytes(frame.jpeg or _jpeg(frame.image, self.config.jpeg_quality))
            index.append({"file": name, "capture_time": frame.capture_time})
        (folder / "index.json").write_text(json.dumps(index))

    @staticmethod
    def _write_mp4(path: Path, footage: list[Footage]) -> bool:
        images = [f.image if f.image is not None else cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR)
                  for f in footage]
        span = footage[-1].capture_time - footage[0].capture_time
        fps = (len(footage) - 1) / span if span > 0 else 1.0
        h, w = images[0].shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        if not writer.isOpened():
            log.warning("sentinel.mp4_unavailable", path=str(path), fallback="jpeg-sequence")
            return False
        try:
            for img in images:
                writer.write(img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h)))
        finally:
            writer.release()
        return path.exists() and path.stat().st_size > 0

    # ------------------------------------------------------------------ retention
    def enforce_retention(self) -> list[str]:
        """Drop clips older than the age limit, then the oldest until the total fits the size limit."""
        cfg = self.config
        rows = self.db.connect().execute("SELECT clip_id, event_time, size_bytes FROM sentinel_clips "
                                         "ORDER BY event_time DESC").fetchall()
        keep_bytes, doomed = 0, []
        for i, row in enumerate(rows):
            too_old = self.clock() - row["event_time"] > cfg.clip_max_age_seconds
            # The newest clip stays even alone over the size limit: it is the evidence of what just happened.
            if too_old or (i > 0 and keep_bytes + row["size_bytes"] > cfg.clip_max_total_bytes):
                doomed.append(row["clip_id"])
            else:
                keep_bytes += row["size_bytes"]
        for clip_id in doomed:
            self.delete(clip_id)
        if doomed:
            log.info("sentinel.retention", deleted=len(doomed), kept_bytes=keep_bytes)
        return doomed

    def delete(self, clip_id: str) -> None:
        row = self.row(clip_id)
        for path in (Path(row["path"]), Path(row["snapshot_path"]) if row["snapshot_path"] else None):
            if path is not None and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path is not None:
                path.unlink(missing_ok=True)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM sentinel_clips WHERE clip_id=?", (clip_id,))

    # ------------------------------------------------------------------ queries
    def row(self, clip_id: str):
        row = self.db.connect().execute("SELECT * FROM sentinel_clips WHERE clip_id=?", (clip_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no clip {clip_id!r}")
        return row

    def list(self, limit: int = 0) -> list[skills_pb2.Clip]:
        rows = self.db.connect().execute("SELECT * FROM sentinel_clips ORDER BY event_time DESC LIMIT ?",
                                         (limit or -1,)).fetchall()
        return [clip_message(r) for r in rows]

    def files(self, clip_id: str, camera_id: str = "") -> list[tuple[str, str, Path]]:
        """(name, camera_id, path) of every file a download streams, snapshot first."""
        row = self.row(clip_id)
        if not row["complete"]:
            raise PreconditionError(f"clip {clip_id!r} is still recording its post-event footage (until "
                                    f"{row['end_time']:.1f})")
        folder = Path(row["path"])
        if not folder.is_dir():   # clips from before multi-camera recording: one file or one folder
            raise NotFoundError(f"clip {clip_id!r}: files are gone from {folder}")
        cameras = [c["camera_id"] for c in json.loads(row["cameras_json"])]
        if camera_id and camera_id not in cameras:
            raise NotFoundError(f"clip {clip_id!r} has no footage from camera {camera_id!r} (has {cameras})")
        out = [] if camera_id else [("snapshot.jpg", "", folder / "snapshot.jpg")]
        for cam in cameras if not camera_id else [camera_id]:
            mp4 = folder / f"{cam}.mp4"
            paths = [mp4] if mp4.exists() else sorted((folder / cam).iterdir())
            out += [(str(p.relative_to(folder)), cam, p) for p in paths]
        missing = [str(p) for _, _, p in out if not p.exists()]
        if missing:
            raise NotFoundError(f"clip {clip_id!r}: files are gone: {missing[:3]}")
        return out

    def label(self, clip_id: str, note: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE sentinel_clips SET false_positive=1, note=? WHERE clip_id=?", (note, clip_id))


def clip_message(row) -> skills_pb2.Clip:
    clip = skills_pb2.Clip(clip_id=row["clip_id"], event_cursor=row["event_cursor"], camera_id=row["camera_id"],
                           frame_count=row["frame_count"], size_bytes=row["size_bytes"], format=row["format"],
                           description=row["description"], false_positive=bool(row["false_positive"]),
                           complete=bool(row["complete"]), level=row["level"], trigger=row["trigger"],
                           zone=row["zone"])
    clip.start_time.FromNanoseconds(int(row["start_time"] * 1e9))
    clip.event_time.FromNanoseconds(int(row["event_time"] * 1e9))
    clip.end_time.FromNanoseconds(int(row["end_time"] * 1e9))
    for cam in json.loads(row["cameras_json"]):
        clip.cameras.add(camera_id=cam["camera_id"], position=cam["position"], frame_count=cam["frame_count"],
                         frames_before_event=cam["frames_before_event"], frames_per_second=cam["fps"])
    return clip


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()
