"""The power governor: a once-a-period control loop holding the mode's power budget.

It walks a ladder of levels (config `governor.levels`): each lower rung puts the HTP in a thriftier performance
mode, scales every camera's analysis rate down and shortens the cascade. Floors protect what must keep running:
the sentry person detector and Safety's cameras keep a minimum rate and depth whatever the level, and when
Safety's recent latency nears its budget the governor steps back up (a faster NPU) before saving again.

Decisions go to `incar_governor_level`, `incar_governor_decisions_total{action}`,
`incar_camera_analysis_rate_fps{camera}`, `incar_camera_cascade_depth{camera}`, `incar_htp_performance_mode{mode}`
and the log (`governor.decision`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge

from service.power.budgets import BudgetTracker
from service.power.config import HTP_MODES, GovernorConfig, HtpModeModel, _htp_mode_defaults
from service.power.sources import PowerSource

log = structlog.get_logger(__name__)

GOVERNOR_LEVEL = Gauge("incar_governor_level", "Governor level: 0 is full performance, higher saves more power")
GOVERNOR_DECISIONS = Counter("incar_governor_decisions_total", "Governor level changes, by reason", ["action"])
CAMERA_RATE = Gauge("incar_camera_analysis_rate_fps", "Analysis rate the governor set per camera", ["camera"])
CAMERA_DEPTH = Gauge("incar_camera_cascade_depth", "Cascade stages the governor allows per camera", ["camera"])
HTP_MODE = Gauge("incar_htp_performance_mode", "The HTP performance mode in use (1)", ["mode"])
SMOOTHED_WATTS = Gauge("incar_governor_smoothed_watts", "The smoothed power the governor acts on")

ACTIONS = ("step_down", "step_up", "latency_guard", "mode_reset")


@dataclass
class CameraPlan:
    camera_id: str
    nominal_fps: float
    max_stages: int
    purposes: tuple[str, ...]      # skills that rely on this camera: "sentinel", "safety", ...
    fps: float = 0.0               # what is applied now
    stages: int = 0


@dataclass(frozen=True)
class Decision:
    time: float
    level: int
    action: str                    # one of ACTIONS, or "hold"
    mode: str
    smoothed_watts: float
    budget_watts: float


Hook = Callable[..., object]


class Governor:
    def __init__(self, config: GovernorConfig, source: PowerSource, budgets: BudgetTracker, *,
                 set_analysis_rate: Hook | None = None, set_cascade_depth: Hook | None = None,
                 set_htp_performance_mode: Hook | None = None, clock: Callable[[], float] = time.monotonic,
                 htp_modes: dict[str, HtpModeModel] | None = None):
        config.validate()
        self.htp_modes = htp_modes or _htp_mode_defaults()
        self.config = config
        self.source = source
        self.budgets = budgets
        self.clock = clock
        self.hooks = {"set_analysis_rate": set_analysis_rate, "set_cascade_depth": set_cascade_depth,
                      "set_htp_performance_mode": set_htp_performance_mode}
        self.cameras: dict[str, CameraPlan] = {}
        self.active_skills: set[str] = {"safety", "sentinel"}
        self.level = 0
        self.htp_mode = ""
        self.smoothed_watts: float | None = None
        self._last_change = -math.inf
        self._guard_until = -math.inf
        self._latency_ceiling: tuple[int, float] | None = None     # (first too-slow level, until when)
        self._power_at_level: dict[int, tuple[float, float]] = {}   # level -> (smoothed watts, when)
        self.decisions: list[Decision] = []
        for action in ACTIONS:
            GOVERNOR_DECISIONS.labels(action)
        self._apply()

    # -- wiring
    def add_camera(self, camera_id: str, nominal_fps: float, *, max_stages: int = 4,
                   purposes: Iterable[str] = ("sentinel",)) -> None:
        if not camera_id:
            raise ValueError("camera_id: empty")
        if not (math.isfinite(nominal_fps) and nominal_fps > 0):
            raise ValueError(f"nominal_fps for {camera_id}: must be > 0")
        if max_stages < 1:
            raise ValueError(f"max_stages for {camera_id}: must be >= 1")
        self.cameras[camera_id] = CameraPlan(camera_id, nominal_fps, max_stages, tuple(purposes))
        self._apply()

    def set_skill_active(self, skill: str, active: bool) -> None:
        """Floors apply only for active skills (Safety while occupants may exit, Sentinel while armed)."""
        before = set(self.active_skills)
        (self.active_skills.add if active else self.active_skills.discard)(skill)
        if before != self.active_skills:
            self._apply()

    # -- targets
    def camera_target(self, plan: CameraPlan, level: int | None = None) -> tuple[float, int]:
        rung = self.config.levels[self.level if level is None else level]
        live = [p for p in plan.purposes if p in self.active_skills]
        floor_fps = max((self.config.floor_fps.get(p, 0.0) for p in live), default=0.0)
        floor_stages = max((self.config.floor_stages.get(p, 1) for p in live), default=1)
        fps = min(plan.nominal_fps, max(plan.nominal_fps * rung.rate_scale, floor_fps))
        stages = min(plan.max_stages, max(rung.cascade_depth, floor_stages))
        return fps, stages

    # -- the loop
    def tick(self) -> Decision:
        reading = self.source.sample()
        watts = reading.total_watts
        self.budgets.observe_power(watts, reading.interval)
        now = self.clock()
        if self.smoothed_watts is None or reading.interval <= 0:
            self.smoothed_watts = watts if self.smoothed_watts is None else self.smoothed_watts
        else:
            alpha = 1.0 - math.exp(-reading.interval / self.config.smoothing_seconds)
            self.smoothed_watts += alpha * (watts - self.smoothed_watts)
        SMOOTHED_WATTS.set(self.smoothed_watts)
        mode = self.budgets.mode
        budget = self.budgets.power_budget()
        action = self._decide(now, mode, budget)
        decision = Decision(now, self.level, action, mode, self.smoothed_watts, budget)
        if action != "hold":
            GOVERNOR_DECISIONS.labels(action).inc()
            self.decisions.append(decision)
            log.info("governor.decision", action=action, level=self.level, mode=mode,
                     htp_mode=self.config.levels[self.level].htp_mode,
                     smoothed_w=round(self.smoothed_watts, 3), budget_w=budget)
            self._apply()
        return decision

    def _decide(self, now: float, mode: str, budget: float) -> str:
        cfg = self.config
        top = len(cfg.levels) - 1
        if not cfg.enabled or mode not in cfg.governed_modes:
            if self.level != 0:
                self._change(0, now)
                return "mode_reset"
            return "hold"
        for skill in cfg.latency_guard_skills:
            if skill not in self.active_skills:
                continue
            worst = self.budgets.worst_recent_latency(skill, cfg.latency_guard_window_seconds)
            if worst is not None and worst > self.budgets.latency_budget(skill) * cfg.latency_guard_ratio:
                self._guard_until = now + cfg.step_up_hold_seconds
                # Queueing makes latency jump, not creep, near saturation: remember this level as too slow.
                ceiling = self.level if self._latency_ceiling is None else min(self._latency_ceiling[0], self.level)
                self._latency_ceiling = (ceiling, now + cfg.latency_guard_memory_seconds)
                if self.level > 0 and now - self._last_change >= cfg.settle_seconds:
                    self._change(self.level - 1, now)
                    return "latency_guard"
                return "hold"
        smoothed = self.smoothed_watts or 0.0
        if (smoothed > budget * cfg.step_down_ratio and self.level < top and now >= self._guard_until
                and now - self._last_change >= cfg.settle_seconds and self._latency_allows(self.level + 1, now)):
            self._change(self.level + 1, now)
            return "step_down"
        held = now - self._last_change >= cfg.step_up_hold_seconds
        if smoothed < budget * cfg.step_up_ratio and self.level > 0 and held:
            # Don't climb back to a rung that was recently measured over budget: that is how governors flap.
            known = self._power_at_level.get(self.level - 1)
            stale = now - known[1] > 6 * cfg.step_up_hold_seconds if known is not None else True
            if known is None or known[0] <= budget * cfg.step_down_ratio or stale:
                self._change(self.level - 1, now)
                return "step_up"
        return "hold"

    def _latency_allows(self, level: int, now: float) -> bool:
        """Would the guarded skills keep their budgets at `level`? NPU latency scales with 1 / HTP clock."""
        if self._latency_ceiling is not None:
            ceiling, until = self._latency_ceiling
            if now >= until or not any(s in self.active_skills for s in self.config.latency_guard_skills):
                self._latency_ceiling = None
            elif level >= ceiling:
                return False
        slowdown = (self.htp_modes[self.config.levels[self.level].htp_mode].clock
                    / self.htp_modes[self.config.levels[level].htp_mode].clock)
        for skill in self.config.latency_guard_skills:
            if skill not in self.active_skills:
                continue
            worst = self.budgets.worst_recent_latency(skill, self.config.latency_guard_window_seconds)
            limit = self.budgets.latency_budget(skill) * self.config.latency_guard_ratio
            if worst is not None and worst * slowdown > limit:
                return False
        return True

    def _change(self, level: int, now: float) -> None:
        if self.smoothed_watts is not None:
            self._power_at_level[self.level] = (self.smoothed_watts, now)
        self.level = level
        self._last_change = now

    def _apply(self) -> None:
        rung = self.config.levels[self.level]
        GOVERNOR_LEVEL.set(self.level)
        if rung.htp_mode != self.htp_mode:
            self.htp_mode = rung.htp_mode
            try:
                self.source.set_performance_mode(rung.htp_mode)
            except ValueError as exc:
                log.warning("governor.model_mode_unknown", error=str(exc))
            self._call("set_htp_performance_mode", rung.htp_mode)
            for mode in HTP_MODES:
                HTP_MODE.labels(mode).set(1 if mode == rung.htp_mode else 0)
        for plan in self.cameras.values():
            fps, stages = self.camera_target(plan)
            if fps != plan.fps:
                plan.fps = fps
                self._call("set_analysis_rate", plan.camera_id, fps)
                CAMERA_RATE.labels(plan.camera_id).set(fps)
            if stages != plan.stages:
                plan.stages = stages
                self._call("set_cascade_depth", plan.camera_id, stages)
                CAMERA_DEPTH.labels(plan.camera_id).set(stages)

    def _call(self, hook: str, *args) -> None:
        fn = self.hooks[hook]
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:   # a failing knob must not stop the loop that protects the battery
            log.exception("governor.hook_failed", hook=hook, args=args)
