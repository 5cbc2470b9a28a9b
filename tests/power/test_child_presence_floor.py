"""Safety's child presence in the locked power modes: the governor saves power everywhere else, but the cabin
camera keeps its floor rate and stages (motion, faces, the person detector) while the car is parked and locked,
whether Sentinel is armed (sentry) or not (off); exterior cameras are not held up by it."""
from __future__ import annotations

from service.power.config import PowerConfig
from service.power.manager import PowerManager


def manager_in(mode: str):
    config = PowerConfig(source="model")
    config.governor.governed_modes = ["sentry", "off", "parked_awake"]
    rates, depths = {}, {}
    manager = PowerManager(config, "qnn-htp", mode_provider=lambda: mode,
                           set_analysis_rate=lambda cam, fps: rates.__setitem__(cam, fps),
                           set_cascade_depth=lambda cam, depth: depths.__setitem__(cam, depth))
    manager.governor.add_camera("cabin", 10.0, purposes=("safety", "child_presence"))
    manager.governor.add_camera("left", 10.0, purposes=("sentinel", "safety"))
    manager.tick()
    deepest = len(config.governor.levels) - 1
    manager.governor.level = deepest          # the most frugal rung of the ladder
    manager.governor._apply()
    return config, manager, rates, depths


def test_locked_modes_keep_the_cabin_at_the_child_presence_floor():
    for mode in ("sentry", "off"):
        config, manager, rates, depths = manager_in(mode)
        floor = config.governor.floor_fps["child_presence"]
        rung = config.governor.levels[manager.governor.level]
        assert 10.0 * rung.rate_scale < floor, "the test needs a rung below the floor"
        assert rates["cabin"] == floor and depths["cabin"] == config.governor.floor_stages["child_presence"]
        assert "child_presence" in manager.governor.active_skills and "safety" not in manager.governor.active_skills
        # The side camera has no child-presence purpose: off mode lets it sink to the rung's rate.
        if mode == "off":
            assert rates["left"] == 10.0 * rung.rate_scale


def test_driving_does_not_hold_the_cabin_for_child_presence():
    config, manager, rates, depths = manager_in("driving")
    assert "child_presence" not in manager.governor.active_skills
