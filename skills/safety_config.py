"""Settings of the Safety skill (the `skills.safety` section), with embedded defaults.

Child presence follows the shape of Euro NCAP's child presence detection protocol: warn the occupants first,
then the owner, then people nearby, then act on the cabin, then call for help; the times are configuration.
Safe exit follows Hyundai/Kia's Safe Exit Assist: a door stays locked while something approaches from behind
on that side. Zones are boxes in frame fractions (x1, y1, x2, y2 in 0..1), keyed by camera position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from skills.base import validate_norm_boxes

SEATS = ("driver", "front_passenger", "rear_left", "rear_center", "rear_right")
SIDES = ("left", "right")


@dataclass
class EscalationStep:
    """One rung of the child-presence ladder: `after_seconds` from confirmation, these vehicle actions."""
    after_seconds: float = 0.0
    actions: list[str] = field(default_factory=list)   # action kinds (service.actions); [] = cabin warning only
    message: str = ""

    def validate(self, where: str) -> None:
        if self.after_seconds < 0:
            raise ValueError(f"{where}.after_seconds: must be >= 0")
        from service.actions.model import kind_name   # the action kinds the vehicle gateway knows
        for kind in self.actions:
            try:
                kind_name(kind)
            except ValueError as exc:
                raise ValueError(f"{where}.actions: {exc}") from None


def _ladder() -> list[EscalationStep]:
    return [
        EscalationStep(0.0, [], "Child presence warning: someone may still be in the car"),
        EscalationStep(30.0, ["owner_notification"], "Someone may be left in the locked car"),
        EscalationStep(60.0, ["horn", "hazard_lights"], "Someone is still in the locked car: sounding the horn"),
        EscalationStep(120.0, ["climate_on", "window_vent"], "Someone is still in the car: cooling the cabin"),
        EscalationStep(180.0, ["emergency_call"], "Someone is still in the car: calling for help"),
    ]


def _seat_zones() -> dict[str, dict[str, list[float]]]:
    # Cameras look rearward from the dashboard or the roof, so the car's left is the image's right.
    return {
        "cabin_front": {"front_passenger": [0.0, 0.15, 0.5, 1.0], "driver": [0.5, 0.15, 1.0, 1.0]},
        "cabin_rear": {"rear_right": [0.0, 0.15, 0.36, 1.0], "rear_center": [0.34, 0.15, 0.66, 1.0],
                       "rear_left": [0.64, 0.15, 1.0, 1.0]},
    }


def _door_paths() -> dict[str, dict[str, list[float]]]:
    # Where something must be to strike an opening door: side cameras look back along the car; the rear
    # camera sees both sides' lanes (its image left is the car's right).
    return {
        "left": {"left": [0.0, 0.1, 1.0, 1.0]},
        "right": {"right": [0.0, 0.1, 1.0, 1.0]},
        "rear": {"right": [0.0, 0.1, 0.45, 1.0], "left": [0.55, 0.1, 1.0, 1.0]},
    }


@dataclass
class SafetyConfig:
    # ---- child presence
    monitor_seconds: float = 1800.0        # after locking (or closing up with someone inside) watch this long
    seat_zones: dict[str, dict[str, list[float]]] = field(default_factory=_seat_zones)
    presence_min_score: float = 0.4        # person / face / body scores that count
    pose_min_keypoints: int = 5            # a body needs this many confident keypoints
    seat_motion_fraction: float = 0.02     # small motion (a sleeping child breathing, a hand) in a seat zone
    child_confirm_frames: int = 3          # analysed frames with someone in a zone ...
    child_confirm_window: int = 5          # ... among this many most recent analysed frames of that camera
    child_age_years: float = 13.0          # a face estimated younger: a child
    adult_age_years: float = 18.0          # older: an adult; between the two: not sure
    pet_labels: list[str] = field(default_factory=lambda: ["dog", "cat"])
    escalation: list[EscalationStep] = field(default_factory=_ladder)
    notification_repeat_seconds: float = 60.0   # after the owner was first told, tell again this often ...
    max_notifications: int = 10                 # ... this many times in all
    # ---- safe exit
    exit_speed_kmh: float = 3.0            # at or above it the car is moving: no exit
    exit_hazard_labels: list[str] = field(default_factory=lambda: ["bicycle", "motorcycle", "car", "bus", "truck"])
    exit_min_score: float = 0.4
    door_path_zones: dict[str, dict[str, list[float]]] = field(default_factory=_door_paths)
    exit_window_seconds: float = 0.7       # the box-scale rate is a fit over this much track history
    exit_min_frames: int = 5               # ... of at least this many boxes (0.7 s, 5: no warning from 3 % jitter)
    exit_max_window_seconds: float = 2.0   # ... reaching back this far for them when frames come slower
    exit_min_scale_rate: float = 0.25      # speed floor: relative growth of the box's size per second
    exit_ttc_seconds: float = 3.5          # warn when time to collision is below this
    exit_confirm_frames: int = 2           # the condition holds on this many consecutive frames (one confirmation)
    exit_passed_seconds: float = 1.0       # a warned track unseen (or receding) this long has passed: lift the hold
    exit_hold_seconds: float = 10.0        # a door-lock hold expires by itself after this (the gateway's safety net)
    # ---- items left behind
    item_labels: list[str] = field(default_factory=lambda: ["handbag", "backpack", "suitcase", "cell phone",
                                                            "laptop", "umbrella"])
    item_min_score: float = 0.4
    item_confirm_frames: int = 3

    def validate(self) -> None:
        for key in ("monitor_seconds", "notification_repeat_seconds", "exit_speed_kmh", "exit_window_seconds",
                    "exit_min_scale_rate", "exit_ttc_seconds", "exit_max_window_seconds", "exit_passed_seconds",
                    "exit_hold_seconds"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0")
        for key in ("child_confirm_frames", "item_confirm_frames", "max_notifications", "exit_confirm_frames",
                    "pose_min_keypoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1")
        if self.exit_min_frames < 2:
            raise ValueError("exit_min_frames: must be >= 2 (a rate needs two boxes)")
        if self.child_confirm_window < self.child_confirm_frames:
            raise ValueError("child_confirm_window: must be >= child_confirm_frames")
        if not 0 < self.child_age_years <= self.adult_age_years:
            raise ValueError("child_age_years: expected 0 < child_age_years <= adult_age_years")
        if not self.escalation:
            raise ValueError("escalation: at least one step (the cabin warning)")
        times = [step.after_seconds for step in self.escalation]
        if times != sorted(times):
            raise ValueError("escalation: steps must come in time order")
        for i, step in enumerate(self.escalation):
            step.validate(f"escalation[{i}]")
        for position, zones in self.seat_zones.items():
            unknown = [seat for seat in zones if seat not in SEATS]
            if unknown:
                raise ValueError(f"seat_zones.{position}: unknown seats {unknown}; expected some of {list(SEATS)}")
            validate_norm_boxes(f"seat_zones.{position}", list(zones.values()))
        for position, zones in self.door_path_zones.items():
            unknown = [side for side in zones if side not in SIDES]
            if unknown:
                raise ValueError(f"door_path_zones.{position}: unknown sides {unknown}; expected left, right")
            validate_norm_boxes(f"door_path_zones.{position}", list(zones.values()))

    @property
    def owner_notification_seconds(self) -> float | None:
        """When the owner is first told (the first step with an owner notification), None if never."""
        return next((s.after_seconds for s in self.escalation if "owner_notification" in s.actions), None)
