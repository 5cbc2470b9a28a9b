"""One object the server wires: power source, budgets and governor built from the `power` config section.

    power = PowerManager(config.power, backend=config.runtime.backend, mode_provider=app.vehicle.mode,
                         set_analysis_rate=hub.set_analysis_rate, set_cascade_depth=perception.set_cascade_depth,
                         set_htp_performance_mode=runtime.set_htp_performance_mode)
    power.governor.add_camera("front", nominal_fps=10, purposes=("sentinel", "safety"))
    task = asyncio.create_task(power.run())
    power.observe_latency("safety", seconds)      # from skills: frame capture -> decision
    record_busy("npu", seconds)                   # from the runtime/perception (service.power.sources)
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from service.power.budgets import BudgetTracker
from service.power.config import PowerConfig
from service.power.governor import Governor, Hook
from service.power.sources import create_power_source

log = structlog.get_logger(__name__)

# Which floors matter in which mode: Safety guards occupants getting out (someone may be inside while awake),
# Sentinel watches the parked, locked car, and Safety's child presence watches the cabin of a parked car (the
# locked modes are when a child left behind matters most: its cabin stages never drop below their floor).
ACTIVE_SKILLS = {
    "driving": {"safety"},
    "parked_awake": {"safety", "sentinel", "child_presence"},
    "sentry": {"sentinel", "child_presence"},
    "off": {"child_presence"},
}


class PowerManager:
    def __init__(self, config: PowerConfig, backend: str, *, mode_provider: Callable[[], str] | None = None,
                 set_analysis_rate: Hook | None = None, set_cascade_depth: Hook | None = None,
                 set_htp_performance_mode: Hook | None = None, clock: Callable[[], float] = time.monotonic):
        config.validate()
        self.config = config
        self.mode_provider = mode_provider
        self.source = create_power_source(config, backend, clock=clock)
        self.budgets = BudgetTracker(config.budgets, clock=clock)
        self.governor = Governor(config.governor, self.source, self.budgets, clock=clock,
                                 htp_modes=config.htp_modes, set_analysis_rate=set_analysis_rate,
                                 set_cascade_depth=set_cascade_depth,
                                 set_htp_performance_mode=set_htp_performance_mode)
        self._apply_mode(self.budgets.mode)

    def _apply_mode(self, mode: str) -> None:
        self.budgets.set_mode(mode)
        for skill in ("safety", "sentinel", "child_presence"):
            self.governor.set_skill_active(skill, skill in ACTIVE_SKILLS[mode])

    def observe_latency(self, skill: str, seconds: float) -> bool:
        return self.budgets.observe_latency(skill, seconds)

    def tick(self):
        if self.mode_provider is not None:
            self._apply_mode(self.mode_provider())
        return self.governor.tick()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Sample, judge and govern every `governor.period_seconds` until cancelled or `stop` is set."""
        stop = stop or asyncio.Event()
        log.info("power.started", source=self.source.name, period_s=self.config.governor.period_seconds)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:   # the loop that protects the battery keeps going
                log.exception("power.tick_failed")
            try:
                await asyncio.wait_for(stop.wait(), self.config.governor.period_seconds)
            except TimeoutError:
                pass
