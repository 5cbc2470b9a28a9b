"""AI Sentinel: parked-car surveillance, after Tesla's Sentry Mode. Disarmed -> Standby -> Alert -> Alarm ->
(cool-down) -> Standby.

Armed when locked and parked (unless configured off), never at a saved place (home, work) and never below the
battery floor; an owner's Arm or Disarm holds until the next unlock. Arming, the owner's request and the state
are stored, so a restart comes back as it was and says nothing new. Alert: one person (a tracker id) lingering
near the car, approaching it (not passing by), or at the car. Alarm: a hand at a door handle or a window (pose),
or an intrusion sensor (shock, tilt, glass break, a door forced). Each Alert and Alarm: a snapshot and the model's
description in one durable event, the configured vehicle actions (headlight flash; horn, owner notification),
and a clip from every exterior camera, 10 s before to 10 s after, at the cameras' own frame rate.
False-positive feedback on a clip raises its zone's thresholds (skills/README.md).
"""
from __future__ import annotations

import asyncio
import math
import uuid

import numpy as np
import structlog

from incar.v1 import common_pb2, skills_pb2, vehicle_pb2
from service.perception.types import FrameAnalysis
from service.runtime.scheduler import JobClass
from skills.base import NotFoundError, PreconditionError, Skill, SkillContext, is_moving, narrate
from skills.config import SentinelConfig
from skills.sentinel_clips import ClipStore, footage_of
from skills.sentinel_watch import CameraWatch, ZoneThresholds, intrusion_signals

log = structlog.get_logger(__name__)

EARTH_RADIUS_M = 6_371_008.8
STATE = skills_pb2.SentinelState
LEVELS = {"alert": skills_pb2.SENTINEL_STATE_ALERT, "alarm": skills_pb2.SENTINEL_STATE_ALARM}
SENSOR_ZONES = ("sensor.shock", "sensor.tilt")


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


class Sentinel(Skill):
    name = "sentinel"

    def __init__(self, ctx: SkillContext, config: SentinelConfig | None = None):
        super().__init__(ctx)
        self.config = config or SentinelConfig()
        self.clips = ClipStore(ctx.db, ctx.data_dir, self.config, ctx.clock)
        self.clip_dir = self.clips.clip_dir
        self.state = skills_pb2.SENTINEL_STATE_DISARMED
        self.armed = False
        self.reason = "not locked and parked"
        self.since = ctx.clock()
        self._requested: bool | None = None   # True: armed by request; False: disarmed by request (until unlock)
        self._watches: dict[str, CameraWatch] = {}
        self._episode: set[str] = set()       # triggers raised since the last Standby
        self._last_activity = 0.0
        self._recording: dict[str, tuple[float, dict]] = {}   # clip_id -> (event time, pre-event footage)
        self._exterior: dict[str, str] = {}   # exterior camera id -> position, as analyses name them
        self.pose_stages = None               # (camera_id, on): body pose on an exterior camera (service wiring)
        self._pose_on: set[str] = set()

    def connect_perception(self, *, pose_stages=None) -> None:
        """The service's switch for the pose stage: on the exterior cameras while armed (hands at handles)."""
        self.pose_stages = pose_stages
        self._update_pose()

    def _update_pose(self) -> None:
        if self.pose_stages is None:
            return
        want = set(self._exterior) if self.armed else set()
        for camera_id in sorted(want - self._pose_on):
            self.pose_stages(camera_id, True)
        for camera_id in sorted(self._pose_on - want):
            self.pose_stages(camera_id, False)
        self._pose_on = want

    # ------------------------------------------------------------------ arming (stored: restarts keep intent)
    def restore(self) -> None:
        """After `db.migrate()`: the arming, request and state as they were stored; no event unless the stored
        decision no longer holds for the current vehicle state."""
        stored = dict(self.ctx.db.connect().execute("SELECT key, value FROM sentinel_state").fetchall())
        if stored:
            self._requested = {"armed": True, "disarmed": False}.get(stored.get("request", ""))
            self.armed = stored.get("armed") == "1"
            self.state = STATE.Value(stored.get("state", "SENTINEL_STATE_DISARMED"))
            self.since = float(stored.get("since", self.now))
            self.reason = stored.get("reason", self.reason)
            self._last_activity = self.since
        for row in self.ctx.db.connect().execute("SELECT clip_id, event_time FROM sentinel_clips WHERE complete=0"):
            self._recording[row["clip_id"]] = (row["event_time"], {})   # pre-event footage died with the process
        self._evaluate_arming()

    def _store(self) -> None:
        values = {"request": {True: "armed", False: "disarmed"}.get(self._requested, ""),
                  "armed": "1" if self.armed else "0", "state": STATE.Name(self.state), "since": repr(self.since),
                  "reason": self.reason}
        with self.ctx.db.transaction() as tx:
            for key, value in values.items():
                tx.execute("INSERT INTO sentinel_state(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                           "value=excluded.value", (key, value))

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
        out = skills_pb2.SentinelStatus(state=self.state, armed=self.armed, reason=self.reason,
                                        request={True: "armed", False: "disarmed"}.get(self._requested, ""))
        out.since.FromNanoseconds(int(self.since * 1e9))
        out.zones.extend(t for t in self.zone_tunings() if t.false_positives)
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
            self._watches.clear()
            self._set_state(skills_pb2.SENTINEL_STATE_STANDBY)
            self.emit("armed", common_pb2.SEVERITY_INFO, f"Sentinel armed: {reason}", {"reason": reason})
        elif not armed and was:
            self._set_state(skills_pb2.SENTINEL_STATE_DISARMED)
            self.emit("disarmed", common_pb2.SEVERITY_INFO, f"Sentinel disarmed: {reason}", {"reason": reason})
        elif not armed:
            self.state = skills_pb2.SENTINEL_STATE_DISARMED
        self._store()
        self._update_pose()

    def _set_state(self, state: int) -> None:
        if state != self.state:
            log.info("sentinel.state", state=STATE.Name(state), previous=STATE.Name(self.state))
            self.state, self.since = state, self.now
            if state in (skills_pb2.SENTINEL_STATE_STANDBY, skills_pb2.SENTINEL_STATE_DISARMED):
                self._episode.clear()

    async def on_vehicle(self, previous, current) -> None:
        if previous.locked and not current.locked:
            self._requested = None     # the owner is back: a request lasts one locked period
        self._evaluate_arming()
        if self.armed:
            for level, trigger, zone, reason in intrusion_signals(previous, current, self.config, self._factor):
                self._raise(level, trigger, zone, reason, *self._snapshot_camera())

    # ------------------------------------------------------------------ watching
    async def on_frame(self, analysis: FrameAnalysis) -> None:
        if analysis.role != "exterior":
            return
        if analysis.camera_id not in self._exterior:
            self._exterior[analysis.camera_id] = analysis.position
            self._update_pose()
        self._finish_due()
        if not self.armed:
            return
        with self.measure():
            watch = self._watches.setdefault(analysis.camera_id, CameraWatch(analysis.camera_id, analysis.position))
            findings = watch.observe(analysis, self.config, self.thresholds(analysis.position))
            if watch.active(analysis.timestamp, self.config.track_gap_seconds):
                self._last_activity = self.now
        for finding in sorted(findings, key=lambda f: LEVELS[f.level], reverse=True):
            self._raise(finding.level, finding.trigger, analysis.position, finding.reason, analysis.camera_id,
                        analysis.position, analysis.frame, {"track_id": finding.track_id,
                                                            "distance_m": round(finding.distance_m, 2),
                                                            "motion": finding.motion})

    def _raise(self, level: str, trigger: str, zone: str, reason: str, camera_id: str, position: str,
               snapshot: np.ndarray | None, extra: dict | None = None) -> None:
        target = LEVELS[level]
        if target < self.state or trigger in self._episode:
            return
        self._episode.add(trigger)
        previous = self.state
        self._set_state(max(target, self.state))
        self._last_activity = self.now
        self._store()
        event_time = self.now
        clip_id = f"clip-{uuid.uuid4().hex[:16]}"
        # The pre-event footage, taken now (references): the ring moves on while the event is written.
        pre = {cam: (pos, self._footage(cam, event_time - self.config.pre_event_seconds, event_time))
               for cam, pos in self._cameras().items()}
        self.spawn(self._record(clip_id, level, trigger, zone, reason, camera_id, position, snapshot, previous,
                                event_time, pre, extra or {}))

    async def _record(self, clip_id, level, trigger, zone, reason, camera_id, position, snapshot, previous,
                      event_time, pre, extra) -> None:
        where = f"the {position} camera" if position else "the car's sensors"
        draft = f"Sentinel {level} on {where}: {reason}."
        if level == "alarm":     # a break-in: the horn must not wait for the model's words
            description = draft
        else:
            description = await narrate(
                self.ctx.narrator, task="You watch a parked car and tell its owner what the camera saw.",
                draft=draft, priority=JobClass.ALERT, images=(snapshot,) if snapshot is not None else (),
                timeout_s=self.config.narration_timeout_s)
        if snapshot is None:
            snapshot = np.zeros((8, 8, 3), np.uint8)
        await asyncio.to_thread(self.clips.begin, clip_id, level=level, trigger=trigger, zone=zone,
                                camera_id=camera_id, event_time=event_time, snapshot=snapshot,
                                description=description)
        severity = common_pb2.SEVERITY_CRITICAL if level == "alarm" else common_pb2.SEVERITY_WARNING
        event = self.emit(level, severity, description,
                          {"reason": reason, "trigger": trigger, "zone": zone, "clip_id": clip_id,
                           "snapshot_id": f"{clip_id}-snapshot", "previous_state": STATE.Name(previous),
                           "cameras": sorted(pre), "frames_before_event": sum(len(f) for _, f in pre.values()),
                           **extra},
                          camera_id=camera_id, attachment_ids=(clip_id, f"{clip_id}-snapshot"))
        self.clips.set_event(clip_id, event.cursor)
        self._recording[clip_id] = (event_time, pre)
        for kind in self.config.alarm_actions if level == "alarm" else self.config.alert_actions:
            params = {"title": f"Sentinel {level}", "body": description} if kind == "owner_notification" else None
            self.act(kind, reason=f"Sentinel {level}: {reason}", cause_event=event, parameters=params,
                     key=f"sentinel:{clip_id}:{kind}")
        self._finish_due()

    def _cameras(self) -> dict[str, str]:
        """Every exterior camera: those analysed, and those the hub records (analysis may be paused)."""
        cameras = dict(self._exterior)
        recorder = getattr(self.ctx.frames, "recorder", None)
        for camera_id in recorder.camera_ids() if recorder is not None else ():
            frames = recorder.frames(camera_id, -math.inf)
            cameras.setdefault(camera_id, frames[-1].position if frames else "")
        return cameras

    def _footage(self, camera_id: str, since: float, until: float) -> list:
        frames = self.ctx.frames
        if frames is None:
            return []
        if hasattr(frames, "recording"):
            return frames.recording(camera_id, since, until)
        return [f for f in frames.history(camera_id, self.now - since + 1.0) if since <= f.capture_time <= until]

    def _finish_due(self) -> None:
        """Finish clips whose post-event time has passed."""
        for clip_id, (event_time, pre) in list(self._recording.items()):
            if self.now >= event_time + self.config.post_event_seconds:
                del self._recording[clip_id]
                self.spawn(self._finish(clip_id, event_time, pre))

    async def _finish(self, clip_id: str, event_time: float, pre: dict) -> None:
        end = event_time + self.config.post_event_seconds
        cameras = {}
        for camera_id, position in {**{c: p for c, (p, _) in pre.items()}, **self._cameras()}.items():
            before = pre.get(camera_id, (position, []))[1]
            after = [f for f in self._footage(camera_id, event_time, end) if f.capture_time > event_time]
            cameras[camera_id] = (position, before + after)
        summary = await asyncio.to_thread(self._write, clip_id, event_time, cameras)
        self.emit("clip_saved", common_pb2.SEVERITY_INFO,
                  f"Clip {clip_id}: {summary['frames']} frames from {len(summary['cameras'])} cameras",
                  {"clip_id": clip_id, "cameras": summary["cameras"], "size_bytes": summary["bytes"]},
                  attachment_ids=(clip_id,))
        await asyncio.to_thread(self.clips.enforce_retention)

    def _write(self, clip_id: str, event_time: float, cameras: dict) -> dict:
        """In a thread: frames become footage (decoding where they are not JPEG) and are written."""
        return self.clips.finish(clip_id, event_time, {cam: (pos, [footage_of(f) for f in frames])
                                                       for cam, (pos, frames) in cameras.items()})

    def _snapshot_camera(self) -> tuple[str, str, np.ndarray | None]:
        """For a sensor alarm: the newest frame of any exterior camera (camera id, position, image)."""
        best = None
        for camera_id, position in self._cameras().items():
            latest = self.ctx.frames.latest(camera_id) if self.ctx.frames is not None else None
            if latest is not None and (best is None or latest.capture_time > best[2].capture_time):
                best = (camera_id, position, latest)
        return ("", "", None) if best is None else (best[0], best[1], best[2].original)

    async def tick(self) -> None:
        self._finish_due()
        if self.state in (skills_pb2.SENTINEL_STATE_ALERT, skills_pb2.SENTINEL_STATE_ALARM) and \
                self.now - self._last_activity >= self.config.cooldown_seconds:
            self._watches.clear()
            self._set_state(skills_pb2.SENTINEL_STATE_STANDBY)
            self._store()
            self.emit("standby", common_pb2.SEVERITY_INFO,
                      f"Sentinel back to standby after {self.config.cooldown_seconds:.0f} s without activity")

    # ------------------------------------------------------------------ false-positive feedback
    def _false_positives(self, zone: str) -> int:
        row = self.ctx.db.connect().execute("SELECT false_positives FROM sentinel_zones WHERE zone=?",
                                            (zone,)).fetchone()
        return min(row["false_positives"], self.config.false_positive_max_steps) if row else 0

    def _factor(self, zone: str) -> float:
        return 1 + self.config.false_positive_step * self._false_positives(zone)

    def thresholds(self, zone: str) -> ZoneThresholds:
        return ZoneThresholds.of(self.config, self._false_positives(zone))

    def zone_tuning(self, zone: str) -> skills_pb2.ZoneTuning:
        count = self.ctx.db.connect().execute("SELECT false_positives FROM sentinel_zones WHERE zone=?",
                                              (zone,)).fetchone()
        out = skills_pb2.ZoneTuning(zone=zone, false_positives=count["false_positives"] if count else 0)
        if zone.startswith("sensor."):
            base = {"sensor.shock": self.config.shock_alert_g, "sensor.tilt": self.config.tilt_alarm_deg}.get(zone)
            out.sensor_threshold = base * self._factor(zone) if base is not None else 0.0
        else:
            t = self.thresholds(zone)
            out.linger_seconds, out.near_distance_m, out.confirm_frames = (t.linger_seconds, t.near_distance_m,
                                                                           t.confirm_frames)
        return out

    def zone_tunings(self) -> list[skills_pb2.ZoneTuning]:
        rows = self.ctx.db.connect().execute("SELECT zone FROM sentinel_zones ORDER BY zone").fetchall()
        return [self.zone_tuning(r["zone"]) for r in rows]

    def label_false_positive(self, clip_id: str, note: str = "") -> skills_pb2.ZoneTuning:
        """The owner says this clip showed nothing to worry about: its zone gets less sensitive (once per clip)."""
        row = self.clips.row(clip_id)
        zone = row["zone"] or row["camera_id"]
        if not row["false_positive"]:
            self.clips.label(clip_id, note)
            with self.ctx.db.transaction() as tx:
                tx.execute("INSERT INTO sentinel_zones(zone, false_positives) VALUES(?, 1) ON CONFLICT(zone) "
                           "DO UPDATE SET false_positives=false_positives+1", (zone,))
        tuning = self.zone_tuning(zone)
        self.emit("false_positive", common_pb2.SEVERITY_INFO,
                  f"Clip {clip_id} labelled a false positive; zone {zone} now less sensitive",
                  {"clip_id": clip_id, "note": note, "event_cursor": row["event_cursor"], "zone": zone,
                   "false_positives": tuning.false_positives}, camera_id=row["camera_id"])
        return tuning

    # ------------------------------------------------------------------ clip queries
    def list_clips(self, limit: int = 0) -> list[skills_pb2.Clip]:
        return self.clips.list(limit)

    def clip_files(self, clip_id: str, camera_id: str = ""):
        return self.clips.files(clip_id, camera_id)

    def enforce_retention(self) -> list[str]:
        return self.clips.enforce_retention()

    def delete_clip(self, clip_id: str) -> None:
        self.clips.delete(clip_id)


__all__ = ["Sentinel", "haversine_m", "NotFoundError"]
