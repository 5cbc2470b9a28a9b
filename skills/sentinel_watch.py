"""What Sentinel sees on one exterior camera: people as tracks, their distance from camera geometry, whether
they approach or pass by, how long they dwell, and whether a hand is at a door handle or a window.

Distance comes from a pinhole model of the camera in configuration (`CameraGeometry`): where the feet touch the
ground (mount height and pitch) when the box's bottom is inside the frame, else the box height against an assumed
body height. Tracks come from the cascade's tracker ids (an IoU match here when a frame has none); a track
survives `track_gap_seconds` without a detection, so one missed frame neither resets a dwell timer nor lets two
passers-by in a row add up to one lingering person; confirmation (`confirm_frames`) needs consecutive frames, so
a detector glitch that recurs now and then does not add up either. Hands come from the pose stage (MoveNet wrists);
without a pose the body box at the handle, at touching distance, stands in (and the reason says so).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from incar.v1 import vehicle_pb2
from service.perception.types import Detection, FrameAnalysis, Pose, box_iou
from skills.base import area, centre, inside, overlap, to_pixels
from skills.config import CameraGeometry, SentinelConfig

FEET_MARGIN = 0.03            # a box bottom this close to the frame edge may be cut off: use the box height
LEFT_WRIST, RIGHT_WRIST = 9, 10   # COCO keypoint order (MoveNet)
ALARM_TRIGGERS = ("handle", "window")
ALERT_TRIGGERS = ("touch", "approach", "linger")


@dataclass(frozen=True)
class ZoneThresholds:
    """One zone's thresholds, after false-positive feedback (`level` steps of `false_positive_step`)."""
    linger_seconds: float
    near_distance_m: float
    approach_alert_distance_m: float
    touch_distance_m: float
    confirm_frames: int

    @classmethod
    def of(cls, cfg: SentinelConfig, level: int) -> ZoneThresholds:
        factor = 1 + cfg.false_positive_step * level
        return cls(cfg.linger_seconds * factor, cfg.near_distance_m / factor,
                   cfg.approach_alert_distance_m / factor, cfg.touch_distance_m / factor,
                   math.ceil(cfg.confirm_frames * factor))


def distance_m(box, frame_height: int, geometry: CameraGeometry, person_height_m: float) -> float:
    """Metres from the camera to a standing person whose box (pixels) is `box`."""
    focal = (frame_height / 2) / math.tan(math.radians(geometry.vfov_deg) / 2)
    by_height = focal * person_height_m / max(box[3] - box[1], 1.0)
    if box[3] < frame_height * (1 - FEET_MARGIN):
        below_horizon = math.radians(geometry.pitch_deg) + math.atan((box[3] - frame_height / 2) / focal)
        if below_horizon > math.radians(1.0):
            return geometry.height_m / math.tan(below_horizon)
    return by_height


def lateral_m(box, frame_width: int, frame_height: int, distance: float, geometry: CameraGeometry) -> float:
    focal = (frame_height / 2) / math.tan(math.radians(geometry.vfov_deg) / 2)
    return distance * (centre(box)[0] - frame_width / 2) / focal


@dataclass
class PersonTrack:
    track_id: int
    box: tuple
    first_seen: float
    last_seen: float
    samples: deque = field(default_factory=lambda: deque(maxlen=64))   # (t, distance m, lateral m)
    near_since: float | None = None
    last_near: float | None = None
    streak: dict[str, int] = field(default_factory=dict)   # condition -> consecutive frames holding it
    last_frame: int = -1                                    # the camera's frame number it was last seen on
    raised: set[str] = field(default_factory=set)          # triggers already reported for this person
    motion: str = "standing"                                # "approach", "pass-by", "leaving", "standing"

    @property
    def distance(self) -> float:
        return self.samples[-1][1] if self.samples else math.inf

    def dwell(self, now: float) -> float:
        return 0.0 if self.near_since is None else now - self.near_since


@dataclass(frozen=True)
class Finding:
    level: str            # "alert" | "alarm"
    trigger: str          # see ALARM_TRIGGERS / ALERT_TRIGGERS
    reason: str
    track_id: int
    distance_m: float
    motion: str


def classify_motion(track: PersonTrack, cfg: SentinelConfig, window_s: float) -> str:
    """From the track's last `window_s`: closing distance mostly towards the car is an approach; sideways travel
    with little closing is a pass-by (someone who stops walking becomes "standing" once the walk leaves the
    window)."""
    recent = [s for s in track.samples if s[0] >= track.samples[-1][0] - window_s] if track.samples else []
    if len(recent) < 2:
        return "standing"
    t0, d0, x0 = recent[0]
    t1, d1, x1 = recent[-1]
    # Sideways: the path walked (in steps of about a second, so detector jitter does not add up), not the
    # displacement: someone walking past and back is still walking past.
    steps = [recent[0]]
    for sample in recent[1:]:
        if sample[0] - steps[-1][0] >= 1.0:
            steps.append(sample)
    if steps[-1] is not recent[-1]:
        steps.append(recent[-1])
    closing = d0 - d1
    sideways = sum(abs(b[2] - a[2]) for a, b in zip(steps, steps[1:]))
    if closing >= cfg.approach_min_m and closing >= sideways:
        return "approach"
    if sideways >= cfg.approach_min_m and sideways >= 2 * max(closing, 0.0):
        return "pass-by"
    if -closing >= cfg.approach_min_m:
        return "leaving"
    return "standing"


class CameraWatch:
    """The tracks of one exterior camera."""

    def __init__(self, camera_id: str, position: str):
        self.camera_id, self.position = camera_id, position
        self.tracks: dict[int, PersonTrack] = {}
        self._next_local_id = -1
        self._frame_number = 0

    def observe(self, analysis: FrameAnalysis, cfg: SentinelConfig, zone: ZoneThresholds) -> list[Finding]:
        frame = analysis.frame
        height, width = frame.shape[:2]
        now = analysis.timestamp
        geometry = cfg.camera_geometry.get(analysis.position, CameraGeometry())
        masks = [to_pixels(b, frame) for b in cfg.masks.get(analysis.position, [])]
        handles = [to_pixels(b, frame) for b in cfg.door_handle_zones.get(analysis.position, [])]
        windows = [to_pixels(b, frame) for b in cfg.window_zones.get(analysis.position, [])]
        people = [d for d in analysis.detections if d.label == "person" and d.score >= cfg.person_min_score
                  and not any(inside(centre(d.box), m) for m in masks)]
        pose_ran = "pose" in analysis.stages_run
        if "objects" not in analysis.stages_run:   # the motion gate held the detector back: nothing seen, nothing lost
            self._expire(now, cfg.track_gap_seconds)
            return []
        self._frame_number += 1
        findings = []
        for person in people:
            track = self._track_for(person, now)
            d = distance_m(person.box, height, geometry, cfg.person_height_m)
            track.samples.append((now, d, lateral_m(person.box, width, height, d, geometry)))
            track.motion = classify_motion(track, cfg, zone.linger_seconds)
            near = d <= zone.near_distance_m
            if near:
                if track.near_since is None or now - (track.last_near or now) > cfg.track_gap_seconds:
                    track.near_since = now
                track.last_near = now
            at_car = d <= zone.touch_distance_m
            pose = _pose_for(person, analysis.poses) if pose_ran else None
            if pose is not None:
                wrists = _wrists(pose, cfg.keypoint_min_score)
                at_handle = at_car and any(inside(w, z) for w in wrists for z in handles)
                at_window = at_car and any(inside(w, z) for w in wrists for z in windows)
                how = "a hand"
            else:
                at_handle = at_car and any(overlap(person.box, z) >= 0.5 * area(z) for z in handles)
                at_window = False
                how = "a person (body box, no pose)"
            if not at_window and at_car and windows and analysis.motion is not None:
                moved = [r for r in analysis.motion.regions if not any(inside(centre(r), m) for m in masks)]
                at_window = any(min(1.0, sum(overlap(r, z) for r in moved) / max(area(z), 1.0))
                                >= cfg.window_motion_fraction and overlap(person.box, z) > 0 for z in windows)
            if track.last_frame != self._frame_number - 1:
                track.streak.clear()    # confirmation needs consecutive frames; a gap only spares the dwell
            track.last_frame = self._frame_number
            conditions = {"handle": at_handle, "window": at_window, "touch": at_car,
                          "approach": track.motion == "approach" and d <= zone.approach_alert_distance_m}
            for key, holds in conditions.items():
                track.streak[key] = track.streak.get(key, 0) + 1 if holds else 0
            where = f"{d:.1f} m away, {track.motion}"
            candidates = [
                ("alarm", "handle", track.streak["handle"] >= zone.confirm_frames,
                 f"{how} at a door handle ({where})"),
                ("alarm", "window", track.streak["window"] >= zone.confirm_frames,
                 f"{how} at a window ({where})"),
                ("alert", "touch", track.streak["touch"] >= zone.confirm_frames,
                 f"a person at the car ({where})"),
                ("alert", "approach", track.streak["approach"] >= zone.confirm_frames,
                 f"a person approaching the car ({where})"),
                ("alert", "linger", near and track.motion != "pass-by" and track.dwell(now) >= zone.linger_seconds,
                 f"a person lingering near the car for {track.dwell(now):.0f} s ({where})"),
            ]
            for level, trigger, fired, reason in candidates:
                if fired and trigger not in track.raised:
                    track.raised.add(trigger)
                    findings.append(Finding(level, trigger, reason, track.track_id, d, track.motion))
        self._expire(now, cfg.track_gap_seconds)
        return findings

    def _track_for(self, person: Detection, now: float) -> PersonTrack:
        track_id = person.track_id
        if track_id is None:   # no tracker upstream: the best IoU match among this camera's live tracks
            best, best_iou = None, 0.3
            for track in self.tracks.values():
                if track.last_seen == now:
                    continue
                iou = box_iou(track.box, person.box)
                if iou > best_iou:
                    best, best_iou = track, iou
            if best is not None:
                track_id = best.track_id
            else:
                track_id, self._next_local_id = self._next_local_id, self._next_local_id - 1
        track = self.tracks.get(track_id)
        if track is None:
            track = self.tracks[track_id] = PersonTrack(track_id, person.box, now, now)
        track.box, track.last_seen = person.box, now
        return track

    def _expire(self, now: float, gap: float) -> None:
        for track_id in [i for i, t in self.tracks.items() if now - t.last_seen > gap]:
            del self.tracks[track_id]

    def active(self, now: float, gap: float) -> bool:
        return any(now - t.last_seen <= gap for t in self.tracks.values())


def _pose_for(person: Detection, poses: tuple[Pose, ...]) -> Pose | None:
    best, best_iou = None, 0.3
    for pose in poses:
        iou = box_iou(pose.box, person.box)
        if iou > best_iou:
            best, best_iou = pose, iou
    return best


def _wrists(pose: Pose, min_score: float) -> list[tuple[float, float]]:
    return [(x, y) for i, (x, y, s) in enumerate(pose.keypoints) if i in (LEFT_WRIST, RIGHT_WRIST) and s >= min_score]


def intrusion_signals(previous, current, cfg: SentinelConfig, factor):
    """(level, trigger, zone, reason) for each intrusion signal that rose with this vehicle snapshot; `factor(zone)`
    is the zone's false-positive multiplier of its threshold."""
    before, now = previous.intrusion, current.intrusion
    alarm_g, alert_g = cfg.shock_alarm_g * factor("sensor.shock"), cfg.shock_alert_g * factor("sensor.shock")
    if now.shock_g >= alarm_g > before.shock_g:
        yield "alarm", "shock", "sensor.shock", f"a strong shock ({now.shock_g:.2f} g)"
    elif now.shock_g >= alert_g > before.shock_g:
        yield "alert", "shock", "sensor.shock", f"a light shock ({now.shock_g:.2f} g)"
    tilt = cfg.tilt_alarm_deg * factor("sensor.tilt")
    if now.tilt_deg >= tilt > before.tilt_deg:
        yield "alarm", "tilt", "sensor.tilt", f"the car tilted by {now.tilt_deg:.1f} deg (jacked or towed)"
    if now.glass_break and not before.glass_break:
        yield "alarm", "glass_break", "sensor.glass_break", "glass breaking"
    for door in set(now.forced_doors) - set(before.forced_doors):
        yield "alarm", "forced_door", "sensor.forced_door", f"the {_door_name(door)} door forced open"
    if previous.locked and current.locked:   # a door that opens while the car stays locked was forced too
        was_open = {d.door for d in previous.doors if d.open}
        for door in current.doors:
            if door.open and door.door not in was_open and door.door not in now.forced_doors:
                yield ("alarm", "forced_door", "sensor.forced_door",
                       f"the {_door_name(door.door)} door opened while locked")


def _door_name(door: int) -> str:
    return vehicle_pb2.DoorId.Name(door).removeprefix("DOOR_ID_").lower().replace("_", " ")
