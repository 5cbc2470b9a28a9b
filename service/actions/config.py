"""The `actions` section: how long a safety action may wait for the gateway, how it escalates, how long actions live."""
from __future__ import annotations

from dataclasses import dataclass, field


def _default_expiry() -> dict[str, float]:
    # Seconds an action stays worth doing when the requester names no expiry. A horn a minute late is noise;
    # an emergency call or a notification to the owner is still worth placing minutes later.
    return {"horn": 60.0, "hazard_lights": 600.0, "headlight_flash": 30.0, "door_lock_hold": 30.0,
            "child_lock": 600.0, "window_vent": 900.0, "climate_on": 1800.0, "emergency_call": 1800.0,
            "owner_notification": 86400.0, "seat_mirror_profile": 120.0}


@dataclass
class ActionsConfig:
    ack_timeout_s: float = 3.0          # a safety action unacknowledged this long after a delivery is repeated
    max_escalation_level: int = 3       # repeats keep coming at the cap until acknowledged or expired
    # Repeats back off (ack_timeout_s, then twice that, ...) up to this: a gateway that is gone for an hour
    # costs a delivery every half minute, not every few seconds.
    max_repeat_interval_s: float = 30.0
    # At this escalation level an unacknowledged safety action also raises an owner notification (which travels
    # over MQTT, a path that does not depend on the gateway that is not answering); 0 disables it.
    notify_owner_at_level: int = 2
    expiry_s: dict[str, float] = field(default_factory=_default_expiry)
    tick_s: float = 0.25                # how often repeats and expiries are checked
    retain_deliveries: int = 50_000     # older finished deliveries are pruned

    def validate(self) -> None:
        for key in ("ack_timeout_s", "tick_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        if self.max_repeat_interval_s < self.ack_timeout_s:
            raise ValueError(f"max_repeat_interval_s: must be >= ack_timeout_s ({self.ack_timeout_s})")
        if self.max_escalation_level < 1:
            raise ValueError(f"max_escalation_level: must be >= 1, got {self.max_escalation_level}")
        if not 0 <= self.notify_owner_at_level <= self.max_escalation_level:
            raise ValueError(f"notify_owner_at_level: expected 0..{self.max_escalation_level}, "
                             f"got {self.notify_owner_at_level}")
        known = set(_default_expiry())
        for kind, seconds in self.expiry_s.items():
            if kind not in known:
                raise ValueError(f"expiry_s.{kind}: unknown action kind (known: {', '.join(sorted(known))})")
            if not seconds > 0:
                raise ValueError(f"expiry_s.{kind}: must be > 0, got {seconds!r}")
        if self.retain_deliveries < 100:
            raise ValueError(f"retain_deliveries: must be >= 100, got {self.retain_deliveries}")
