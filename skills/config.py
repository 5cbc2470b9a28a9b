"""Settings of the four skills, with embedded defaults; the service composes them as the `skills` section.

Zones and masks are boxes in frame fractions (x1, y1, x2, y2 in 0..1), keyed by camera mounting position
("front", "rear", "left", "right", "cabin_front", "cabin_rear"), so they survive a change of resolution.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from service.perception.identity import DEFAULT_THRESHOLD as IDENTITY_THRESHOLD
from service.perception.identity import MAX_ENROL_YAW as IDENTITY_MAX_ENROL_YAW
from skills.base import validate_norm_boxes
from skills.safety_config import SafetyConfig

PROFILE_KEY_ENV = "INCAR_PROFILE_KEY"


@dataclass
class SavedPlace:
    name: str = ""
    latitude_deg: float = 0.0
    longitude_deg: float = 0.0


@dataclass
class CameraGeometry:
    """Where an exterior camera sits and looks, for distances from a pinhole model (the camera's calibration)."""
    height_m: float = 1.0                  # lens above the ground
    pitch_deg: float = 0.0                 # looking down by this much
    vfov_deg: float = 60.0                 # vertical field of view

    def validate(self) -> None:
        if not 0 < self.height_m <= 5 or not -45 <= self.pitch_deg <= 80 or not 10 <= self.vfov_deg <= 170:
            raise ValueError("expected 0 < height_m <= 5, pitch_deg -45..80, vfov_deg 10..170")


def _default_geometry() -> dict[str, CameraGeometry]:
    return {"front": CameraGeometry(0.8, 5.0), "rear": CameraGeometry(0.9, 10.0),
            "left": CameraGeometry(1.0, 0.0), "right": CameraGeometry(1.0, 0.0)}


@dataclass
class SentinelConfig:
    auto_arm: bool = True                  # arm by itself when the car is locked and parked
    battery_floor_percent: float = 20.0    # below it Sentinel stays off to save the 12 V battery
    saved_places: list[SavedPlace] = field(default_factory=list)   # home, work: never armed there
    saved_place_radius_m: float = 10.0
    person_min_score: float = 0.4          # as Safety's; confirmation over frames keeps one-off boxes out
    camera_geometry: dict[str, CameraGeometry] = field(default_factory=_default_geometry)
    person_height_m: float = 1.7           # assumed body height when only the box height tells the distance
    near_distance_m: float = 4.0           # a person this close counts as near the car
    touch_distance_m: float = 1.8          # this close: at the car (leaning, touching)
    linger_seconds: float = 5.0            # one person near this long -> Alert
    approach_min_m: float = 1.5            # a track that closed this much distance, mostly towards the car ...
    approach_alert_distance_m: float = 2.5  # ... and is now this close -> Alert (a pass-by never is)
    track_gap_seconds: float = 3.0         # a track survives this long unseen (> the cascade's 2 s idle refresh)
    confirm_frames: int = 3                # a condition must hold on this many frames of one person
    door_handle_zones: dict[str, list[list[float]]] = field(default_factory=lambda: {
        "left": [[0.30, 0.35, 0.45, 0.60], [0.60, 0.35, 0.75, 0.60]],
        "right": [[0.25, 0.35, 0.40, 0.60], [0.55, 0.35, 0.70, 0.60]],
    })
    window_zones: dict[str, list[list[float]]] = field(default_factory=lambda: {
        "left": [[0.20, 0.05, 0.80, 0.35]],
        "right": [[0.20, 0.05, 0.80, 0.35]],
    })
    keypoint_min_score: float = 0.3        # a wrist keypoint counts from this score
    window_motion_fraction: float = 0.15   # share of a window zone that moved (with a person at the car)
    masks: dict[str, list[list[float]]] = field(default_factory=dict)   # ignored regions (trees, a road)
    shock_alert_g: float = 0.15            # a bump: Alert
    shock_alarm_g: float = 0.5             # a blow: Alarm
    tilt_alarm_deg: float = 3.0            # jacked up or towed: Alarm
    false_positive_step: float = 0.25      # each false positive in a zone raises its thresholds by this share
    false_positive_max_steps: int = 4
    alert_actions: list[str] = field(default_factory=lambda: ["headlight_flash"])
    alarm_actions: list[str] = field(default_factory=lambda: ["horn", "headlight_flash", "owner_notification"])
    narration_timeout_s: float = 2.0       # an Alert's words from the model, at most this late (else the draft);
    #                                        an Alarm never waits for words: its horn sounds at once
    cooldown_seconds: float = 30.0         # quiet this long -> back to Standby
    pre_event_seconds: float = 10.0        # clips: footage before the event ...
    post_event_seconds: float = 10.0       # ... and after it, from every exterior camera
    clip_format: str = "jpeg"              # "jpeg" (JPEG sequence per camera) or "mp4" (one file per camera)
    jpeg_quality: int = 85
    clip_max_total_bytes: int = 512 * 1024 * 1024
    clip_max_age_seconds: float = 30 * 24 * 3600.0

    def validate(self) -> None:
        if not 0 <= self.battery_floor_percent <= 100:
            raise ValueError("battery_floor_percent: expected 0..100")
        if self.saved_place_radius_m < 0:
            raise ValueError("saved_place_radius_m: must be >= 0")
        for i, place in enumerate(self.saved_places):
            if not (-90 <= place.latitude_deg <= 90 and -180 <= place.longitude_deg <= 180):
                raise ValueError(f"saved_places[{i}]: latitude/longitude out of range")
        if not 0 < self.touch_distance_m <= self.approach_alert_distance_m <= self.near_distance_m:
            raise ValueError("near_distance_m: expected 0 < touch_distance_m <= approach_alert_distance_m "
                             "<= near_distance_m")
        if self.confirm_frames < 1 or self.false_positive_max_steps < 0:
            raise ValueError("confirm_frames: must be >= 1; false_positive_max_steps >= 0")
        for key in ("linger_seconds", "cooldown_seconds", "pre_event_seconds", "post_event_seconds",
                    "clip_max_age_seconds", "person_height_m", "approach_min_m",
                    "track_gap_seconds", "shock_alert_g", "tilt_alarm_deg", "false_positive_step",
                    "narration_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0")
        if self.shock_alarm_g < self.shock_alert_g:
            raise ValueError("shock_alarm_g: must be >= shock_alert_g")
        if self.clip_format not in ("jpeg", "mp4"):
            raise ValueError(f"clip_format: expected jpeg or mp4, got {self.clip_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality: expected 1..100")
        if self.clip_max_total_bytes <= 0:
            raise ValueError("clip_max_total_bytes: must be > 0")
        for name in ("door_handle_zones", "window_zones", "masks"):
            for position, boxes in getattr(self, name).items():
                validate_norm_boxes(f"{name}.{position}", boxes)
        for position, geometry in self.camera_geometry.items():
            try:
                geometry.validate()
            except ValueError as exc:
                raise ValueError(f"camera_geometry.{position}: {exc}") from None
        from service.actions.model import kind_name   # the action kinds the vehicle gateway knows
        for key in ("alert_actions", "alarm_actions"):
            for kind in getattr(self, key):
                try:
                    kind_name(kind)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None


@dataclass
class GreeterConfig:
    match_threshold: float = IDENTITY_THRESHOLD  # dlib 128-d L2, as perception calibrated it on real faces
    max_attempts: int = 5                  # unmatched face frames per approach before giving up
    attempt_window_seconds: float = 60.0   # an approach; attempts reset after this
    greet_cooldown_seconds: float = 300.0  # do not greet the same person twice in this time
    profile_key: str = ""                  # urlsafe base64 of 32 bytes (AES-256-GCM); else env INCAR_PROFILE_KEY
    max_image_pixels: int = 4096 * 4096    # uploaded enrolment images, checked before decoding
    min_enrol_face_px: int = 80            # enrolment: the face's smaller side, in pixels
    max_enrol_yaw: float = IDENTITY_MAX_ENROL_YAW   # enrolment: how far the head may be turned (0 frontal)
    # Approach (Genesis Face Connect): the side cameras run the face stages while the car is parked and locked and
    # a person approaches there or the key fob is in range, for this long after the last such sign.
    approach_positions: list[str] = field(default_factory=lambda: ["left", "right"])
    approach_face_seconds: float = 30.0
    # ... or stands at the door: a person box this tall (share of the frame height) is within about 2 m. A driver
    # who walks up and stops at the handle no longer looms; they are the one to recognise.
    at_door_box_height: float = 0.6
    fusion_window_seconds: float = 60.0    # a face and the same profile's fob this close in time: both present
    face_only_applies_profile: bool = False   # policy: a recognised face without its fob greets; applies if true
    fob_only_applies_profile: bool = True     # a fob linked to a profile applies it (classic key memory)
    require_liveness: bool = True          # a face must pass the anti-spoof/liveness check to count
    # With passengers, only the face in the driver's seat may apply a profile: per cabin camera position, the
    # driver seat's region of the image (a rear-facing cabin camera sees a left-hand-drive driver on the right).
    driver_seat_zones: dict[str, list[float]] = field(default_factory=lambda: {"cabin_front": [0.5, 0.0, 1.0, 1.0]})

    def resolved_key(self) -> bytes | None:
        text = self.profile_key or os.environ.get(PROFILE_KEY_ENV, "")
        return decode_key(text) if text else None

    def validate(self) -> None:
        if not 0 < self.match_threshold < 2:
            raise ValueError("match_threshold: expected 0..2 (L2 distance of unit-scale embeddings)")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.attempt_window_seconds <= 0 or self.greet_cooldown_seconds < 0:
            raise ValueError("attempt_window_seconds: must be > 0; greet_cooldown_seconds >= 0")
        if self.profile_key:
            decode_key(self.profile_key, "profile_key")
        elif os.environ.get(PROFILE_KEY_ENV):       # checked at start, not at the first enrolment
            decode_key(os.environ[PROFILE_KEY_ENV], f"profile_key (from {PROFILE_KEY_ENV})")
        if self.max_image_pixels < 1:
            raise ValueError("max_image_pixels: must be >= 1")
        if self.min_enrol_face_px < 1 or self.max_enrol_yaw <= 0:
            raise ValueError("min_enrol_face_px: must be >= 1; max_enrol_yaw > 0")
        if self.approach_face_seconds <= 0 or self.fusion_window_seconds <= 0:
            raise ValueError("approach_face_seconds, fusion_window_seconds: must be > 0")
        if not 0 < self.at_door_box_height <= 1:
            raise ValueError("at_door_box_height: expected a share of the frame height in (0, 1]")
        validate_norm_boxes("driver_seat_zones", list(self.driver_seat_zones.values()))


def decode_key(text: str, where: str = PROFILE_KEY_ENV) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError(f"{where}: not base64 (`incar config profile-key` makes a key)") from None
    if len(key) != 32:
        raise ValueError(f"{where}: expected 32 bytes (AES-256) in base64, got {len(key)} "
                         "(`incar config profile-key` makes one)")
    return key


@dataclass
class CarFinderConfig:
    min_text_score: float = 0.5
    snapshot_quality: int = 85
    history_limit: int = 100               # parking records kept
    trail_seconds: float = 900.0           # signs read this long before parking make the trail
    trail_max_readings: int = 200

    def validate(self) -> None:
        if not 0 <= self.min_text_score <= 1:
            raise ValueError("min_text_score: expected 0..1")
        if not 1 <= self.snapshot_quality <= 100:
            raise ValueError("snapshot_quality: expected 1..100")
        if self.history_limit < 1:
            raise ValueError("history_limit: must be >= 1")
        if self.trail_seconds <= 0 or self.trail_max_readings < 1:
            raise ValueError("trail_seconds: must be > 0; trail_max_readings >= 1")


@dataclass
class SkillsConfig:
    data_dir: str = ""                     # "" -> <server.data_dir>/skills
    tick_seconds: float = 0.5              # timer resolution (cool-downs, escalations)
    sentinel: SentinelConfig = field(default_factory=SentinelConfig)
    greeter: GreeterConfig = field(default_factory=GreeterConfig)
    car_finder: CarFinderConfig = field(default_factory=CarFinderConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def validate(self) -> None:
        if self.tick_seconds <= 0:
            raise ValueError("tick_seconds: must be > 0")
        for name in ("sentinel", "greeter", "car_finder", "safety"):
            try:
                getattr(self, name).validate()
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None
