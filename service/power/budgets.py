"""Budgets: watts per vehicle mode, seconds per skill. Observations are compared and violations counted.

The vehicle mode comes from `service.vehicle.vehicle_mode` (gear, speed, ignition, locks, Sentinel armed).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog
from prometheus_client import Counter, Gauge, Histogram

from incar.v1 import vehicle_pb2
from service.power.config import VEHICLE_MODES, BudgetsConfig
from service.vehicle import vehicle_mode

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

POWER_BUDGET_WATTS = Gauge("incar_power_budget_watts", "Power budget per vehicle mode", ["mode"])
POWER_AVERAGE_WATTS = Gauge("incar_power_average_watts",
                            "Whole-service power averaged over the budget window, in the current mode", ["mode"])
POWER_VIOLATIONS = Counter("incar_power_budget_violations_total",
                           "Samples whose windowed average power exceeded the mode's budget", ["mode"])
VEHICLE_MODE = Gauge("incar_vehicle_mode", "The current vehicle mode (1) as the budgets see it", ["mode"])
LATENCY_BUDGET_SECONDS = Gauge("incar_latency_budget_seconds", "Latency budget per skill", ["skill"])
# End to end (frame capture to the skill's decision), which is what a budget promises; the skills' own
# `incar_skill_latency_seconds` measures only their decision step.
FRAME_TO_DECISION = Histogram("incar_frame_to_decision_seconds",
                              "Frame capture (or request) to the skill's decision, per skill", ["skill"],
                              buckets=LATENCY_BUCKETS)
LATENCY_VIOLATIONS = Counter("incar_latency_budget_violations_total",
                             "Skill latencies over the skill's budget", ["skill"])


def mode_of(state: vehicle_pb2.VehicleState, sentry_armed: bool) -> str:
    """driving | parked_awake | sentry | off (the same rule the Vehicle service answers with)."""
    return vehicle_mode(state, sentry_armed)


class BudgetTracker:
    def __init__(self, config: BudgetsConfig, clock: Callable[[], float] = time.monotonic,
                 default_latency_seconds: float = 1.0):
        config.validate()
        self.config = config
        self.clock = clock
        self.default_latency_seconds = default_latency_seconds
        self._lock = threading.Lock()
        self._mode = "off"
        self._power: deque[tuple[float, float, float]] = deque()   # (end time, interval, watts)
        self._latency: dict[str, deque[tuple[float, float]]] = {}  # skill -> (time, seconds)
        for mode, watts in config.power_watts.items():
            POWER_BUDGET_WATTS.labels(mode).set(watts)
        for skill, seconds in config.latency_seconds.items():
            LATENCY_BUDGET_SECONDS.labels(skill).set(seconds)
            LATENCY_VIOLATIONS.labels(skill)      # export zeros, so alerts and panels see the series
        for mode in VEHICLE_MODES:
            POWER_VIOLATIONS.labels(mode)
        self._publish_mode()

    # -- vehicle mode
    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        if mode not in VEHICLE_MODES:
            raise ValueError(f"vehicle mode: unknown {mode!r} (known: {', '.join(VEHICLE_MODES)})")
        if mode != self._mode:
            log.info("budget.mode", mode=mode, previous=self._mode, budget_watts=self.power_budget(mode))
            with self._lock:
                self._mode = mode
                self._power.clear()   # a new mode is judged on its own samples
            self._publish_mode()

    def update_vehicle(self, state: vehicle_pb2.VehicleState, sentry_armed: bool) -> str:
        self.set_mode(mode_of(state, sentry_armed))
        return self._mode

    def _publish_mode(self) -> None:
        for mode in VEHICLE_MODES:
            VEHICLE_MODE.labels(mode).set(1 if mode == self._mode else 0)

    # -- power
    def power_budget(self, mode: str | None = None) -> float:
        return self.config.power_watts[mode or self._mode]

    def observe_power(self, watts: float, interval: float) -> bool:
        """One power sample (watts over `interval` s). True when the windowed average is over budget."""
        now = self.clock()
        with self._lock:
            if interval > 0:
                self._power.append((now, interval, watts))
            horizon = now - self.config.power_window_seconds
            while self._power and self._power[0][0] <= horizon:
                self._power.popleft()
            average = self._average_locked()
        POWER_AVERAGE_WATTS.labels(self._mode).set(average)
        over = average > self.power_budget()
        if over:
            POWER_VIOLATIONS.labels(self._mode).inc()
        return over

    def average_power(self) -> float:
        with self._lock:
            return self._average_locked()

    def _average_locked(self) -> float:
        seconds = sum(i for _, i, _ in self._power)
        return sum(i * w for _, i, w in self._power) / seconds if seconds else 0.0

    # -- latency
    def latency_budget(self, skill: str) -> float:
        return self.config.latency_seconds.get(skill, self.default_latency_seconds)

    def observe_latency(self, skill: str, seconds: float) -> bool:
        """One latency from a skill (frame capture to decision). True when it was over the skill's budget."""
        if not seconds >= 0:
            raise ValueError(f"latency for {skill}: expected >= 0 seconds, got {seconds!r}")
        FRAME_TO_DECISION.labels(skill).observe(seconds)
        budget = self.latency_budget(skill)
        with self._lock:
            self._latency.setdefault(skill, deque(maxlen=1024)).append((self.clock(), seconds))
        if seconds > budget:
            LATENCY_VIOLATIONS.labels(skill).inc()
            log.warning("budget.latency_exceeded", skill=skill, latency_s=round(seconds, 4), budget_s=budget)
            return True
        return False

    def worst_recent_latency(self, skill: str, window_seconds: float) -> float | None:
        """The largest latency the skill reported in the last `window_seconds`, or None."""
        horizon = self.clock() - window_seconds
        with self._lock:
            recent = [s for t, s in self._latency.get(skill, ()) if t >= horizon]
        return max(recent) if recent else None
