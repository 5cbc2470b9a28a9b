"""Power, budget and governor settings with embedded defaults.

The default watts describe a Snapdragon Cockpit SA8295P-class board running the qnn-htp backend. They are
modelled, not measured: public figures put the whole SoC at a few watts idle and ~15-25 W under full load,
and the Hexagon NPU at ~1 W low-clocked to ~5 W in burst. On a board with hwmon/power-supply sensors the
readings replace the model (`source: auto`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from service.htp_modes import HTP_MODES

VEHICLE_MODES = ("driving", "parked_awake", "sentry", "off")
SKILLS = ("safety", "sentinel", "greeter", "car_finder", "chat")



@dataclass
class ComponentPower:
    idle_watts: float = 0.0
    active_watts: float = 0.0
    capacity: float = 1.0          # busy seconds per wall second at 100 % (cpu: the cores the service uses)

    def validate(self) -> None:
        if not (math.isfinite(self.idle_watts) and self.idle_watts >= 0):
            raise ValueError("idle_watts: must be >= 0")
        if not (math.isfinite(self.active_watts) and self.active_watts >= self.idle_watts):
            raise ValueError("active_watts: must be >= idle_watts")
        if not self.capacity > 0:
            raise ValueError("capacity: must be > 0")


@dataclass
class HtpModeModel:
    """How one HTP performance mode scales the NPU: clock (inference speed) and active power, relative to burst."""
    clock: float = 1.0
    power: float = 1.0


def _htp_mode_defaults() -> dict[str, HtpModeModel]:
    # Dynamic power ~ f*V^2 and voltage falls with clock, so power drops faster than speed: lower modes
    # cost more time per inference but less energy per inference.
    return {
        "burst": HtpModeModel(1.00, 1.00),
        "sustained_high_performance": HtpModeModel(0.90, 0.82),
        "high_performance": HtpModeModel(0.85, 0.72),
        "balanced": HtpModeModel(0.65, 0.45),
        "low_balanced": HtpModeModel(0.55, 0.36),
        "high_power_saver": HtpModeModel(0.50, 0.30),
        "power_saver": HtpModeModel(0.40, 0.22),
        "low_power_saver": HtpModeModel(0.30, 0.15),
        "extreme_power_saver": HtpModeModel(0.20, 0.09),
    }


def _backend_defaults() -> dict[str, dict[str, ComponentPower]]:
    # soc: always-on rails (DDR self-refresh, PMIC, always-on subsystem); cameras: sensors streaming (idle)
    # plus ISP/decode work (active); cpu: the cores the service uses; npu: the Hexagon HTP at burst.
    device = {
        "soc": ComponentPower(1.2, 1.2),
        "cameras": ComponentPower(0.8, 1.6),
        "cpu": ComponentPower(0.3, 3.0, capacity=2.0),
        "npu": ComponentPower(0.1, 4.5),
    }
    host_cpu = {  # on hosts the CPU EP does the NPU's work
        "soc": ComponentPower(1.2, 1.2),
        "cameras": ComponentPower(0.8, 1.6),
        "cpu": ComponentPower(0.3, 6.0, capacity=2.0),
        "npu": ComponentPower(0.0, 0.0),
    }
    return {"qnn-htp": device, "qnn-emulator": device, "cpu": host_cpu}


@dataclass
class BudgetsConfig:
    # Whole-service power per vehicle mode, watts. Sentry runs for days on the 12 V battery: the lowest budget
    # that still keeps the exterior person detector running; off leaves only the wake path.
    power_watts: dict[str, float] = field(default_factory=lambda: {
        "driving": 25.0, "parked_awake": 12.0, "sentry": 5.0, "off": 1.5})
    # THE latency budget of each skill (the only place one is set), seconds: frame capture (or request) to the
    # skill's decision or answer; every latency a skill measures is judged against it and counted once, in
    # incar_latency_budget_violations_total. Safety: a safe-exit warning must land well before a door opens into
    # a cyclist; Car Finder: reading every exterior camera at parking; the others are comfort features.
    latency_seconds: dict[str, float] = field(default_factory=lambda: {
        "safety": 0.2, "sentinel": 1.0, "greeter": 1.5, "car_finder": 5.0, "chat": 2.0})
    # Power is judged over this sliding window (watts are noisy per sample).
    power_window_seconds: float = 10.0

    def __post_init__(self):
        # A file or --set that names one mode or skill changes that one; the rest keep their defaults.
        self.power_watts = {**BudgetsConfig.__dataclass_fields__["power_watts"].default_factory(),
                            **self.power_watts}
        self.latency_seconds = {**BudgetsConfig.__dataclass_fields__["latency_seconds"].default_factory(),
                                **self.latency_seconds}

    def validate(self) -> None:
        for mode, watts in self.power_watts.items():
            if mode not in VEHICLE_MODES:
                raise ValueError(f"power_watts.{mode}: unknown vehicle mode (known: {', '.join(VEHICLE_MODES)})")
            if not (math.isfinite(watts) and watts > 0):
                raise ValueError(f"power_watts.{mode}: must be > 0 watts")
        for skill, seconds in self.latency_seconds.items():
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"latency_seconds.{skill}: must be > 0 seconds")
        if not self.power_window_seconds > 0:
            raise ValueError("power_window_seconds: must be > 0")


@dataclass
class GovernorLevel:
    """One rung of the ladder: level 0 is full performance, higher levels save more."""
    htp_mode: str = "burst"
    rate_scale: float = 1.0        # times each camera's nominal analysis rate (floors still apply)
    cascade_depth: int = 4         # stages: motion, detector, identity/text, language model

    def validate(self) -> None:
        if self.htp_mode not in HTP_MODES:
            raise ValueError(f"htp_mode: unknown {self.htp_mode!r} (known: {', '.join(HTP_MODES)})")
        if not 0 < self.rate_scale <= 1:
            raise ValueError("rate_scale: must be in (0, 1]")
        if self.cascade_depth < 1:
            raise ValueError("cascade_depth: must be >= 1")


def _level_defaults() -> list[GovernorLevel]:
    return [
        GovernorLevel("burst", 1.0, 4),
        GovernorLevel("high_performance", 1.0, 4),
        GovernorLevel("balanced", 0.5, 3),
        GovernorLevel("power_saver", 0.25, 3),
        GovernorLevel("low_power_saver", 0.125, 2),
        GovernorLevel("extreme_power_saver", 0.0625, 2),
    ]


@dataclass
class GovernorConfig:
    enabled: bool = True
    period_seconds: float = 1.0            # one decision per period
    # Modes whose power budget the governor holds; in the others it runs at level 0 (driving: Safety first).
    governed_modes: list[str] = field(default_factory=lambda: ["sentry", "parked_awake", "off"])
    # The control signal: power smoothed with this time constant (short: reacts within a few periods; the
    # budget itself is judged over budgets.power_window_seconds).
    smoothing_seconds: float = 3.0
    step_down_ratio: float = 0.92          # save more when smoothed power > budget * this
    step_up_ratio: float = 0.65            # save less when smoothed power < budget * this ...
    step_up_hold_seconds: float = 10.0     # ... and the last change is this old (no flapping)
    settle_seconds: float = 3.0            # after a change, wait this long before saving more again
    levels: list[GovernorLevel] = field(default_factory=_level_defaults)
    # Floors per purpose while that skill is active: the sentry person detector (motion + detector = 2 stages)
    # and Safety's exterior cameras never drop below these, whatever the level.
    # child_presence: the cabin camera while parked (motion, faces, the person detector with pose: 3 stages).
    floor_fps: dict[str, float] = field(default_factory=lambda: {"safety": 10.0, "sentinel": 2.0,
                                                                 "child_presence": 2.0})
    floor_stages: dict[str, int] = field(default_factory=lambda: {"safety": 2, "sentinel": 2, "child_presence": 3})
    # Latency guard: when a guarded skill's worst recent latency passes budget * ratio, step up (faster NPU).
    latency_guard_skills: list[str] = field(default_factory=lambda: ["safety"])
    latency_guard_ratio: float = 0.6
    latency_guard_window_seconds: float = 5.0
    latency_guard_memory_seconds: float = 120.0   # a level that broke a latency budget stays off-limits this long

    def validate(self) -> None:
        if not self.period_seconds > 0:
            raise ValueError("period_seconds: must be > 0")
        for mode in self.governed_modes:
            if mode not in VEHICLE_MODES:
                raise ValueError(f"governed_modes: unknown vehicle mode {mode!r}")
        if not self.smoothing_seconds > 0:
            raise ValueError("smoothing_seconds: must be > 0")
        if not 0 < self.step_up_ratio < self.step_down_ratio <= 1.5:
            raise ValueError("step_up_ratio: must be > 0 and below step_down_ratio (<= 1.5)")
        if self.step_up_hold_seconds < 0 or self.settle_seconds < 0:
            raise ValueError("step_up_hold_seconds: hold and settle times must be >= 0")
        if not self.levels:
            raise ValueError("levels: at least one level")
        for i, level in enumerate(self.levels):
            try:
                level.validate()
            except ValueError as exc:
                raise ValueError(f"levels[{i}].{exc}") from None
        for purpose, fps in self.floor_fps.items():
            if not (math.isfinite(fps) and fps >= 0):
                raise ValueError(f"floor_fps.{purpose}: must be >= 0")
        for purpose, stages in self.floor_stages.items():
            if stages < 1:
                raise ValueError(f"floor_stages.{purpose}: must be >= 1")
        if not 0 < self.latency_guard_ratio <= 1.5:
            raise ValueError("latency_guard_ratio: must be in (0, 1.5]")
        if self.latency_guard_memory_seconds < 0:
            raise ValueError("latency_guard_memory_seconds: must be >= 0")
        if not self.latency_guard_window_seconds > 0:
            raise ValueError("latency_guard_window_seconds: must be > 0")


@dataclass
class PowerConfig:
    source: str = "auto"                   # auto (sysfs sensors when present, else the model) | sysfs | model
    sysfs_root: str = "/sys/class"         # holds hwmon/ and power_supply/
    sysfs_sensors: list[str] = field(default_factory=list)  # "hwmon:<name>/<label>" keys to use; empty: all
    sample_seconds: float = 1.0
    backends: dict[str, dict[str, ComponentPower]] = field(default_factory=_backend_defaults)
    htp_modes: dict[str, HtpModeModel] = field(default_factory=_htp_mode_defaults)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)

    def validate(self) -> None:
        if self.source not in ("auto", "sysfs", "model"):
            raise ValueError(f"source: expected auto|sysfs|model, got {self.source!r}")
        if not self.sample_seconds > 0:
            raise ValueError("sample_seconds: must be > 0")
        for backend, components in self.backends.items():
            if not components:
                raise ValueError(f"backends.{backend}: no components")
            for name, component in components.items():
                try:
                    component.validate()
                except ValueError as exc:
                    raise ValueError(f"backends.{backend}.{name}.{exc}") from None
        for mode, model in self.htp_modes.items():
            if mode not in HTP_MODES:
                raise ValueError(f"htp_modes.{mode}: unknown HTP performance mode")
            if not (0 < model.clock <= 1 and 0 < model.power <= 1):
                raise ValueError(f"htp_modes.{mode}: clock and power must be in (0, 1]")
        for sub in ("budgets", "governor"):
            try:
                getattr(self, sub).validate()
            except ValueError as exc:
                raise ValueError(f"{sub}.{exc}") from None
        for i, level in enumerate(self.governor.levels):
            if level.htp_mode not in self.htp_modes:
                raise ValueError(f"governor.levels[{i}].htp_mode: {level.htp_mode!r} has no htp_modes entry")
