"""The governor on a simulated car: 60 simulated seconds of sentry, floors, Safety's latency, mode changes.

Power is read back from the exported metrics (`incar_energy_joules_total`), as a dashboard would.
"""
from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from incar.v1 import vehicle_pb2
from tests.power.power_simulation import SimCamera, SimCar
from service.power.budgets import BudgetTracker, mode_of
from service.power.config import BudgetsConfig, GovernorConfig, PowerConfig
from service.power.governor import Governor
from service.power.sources import BusyLedger, EnergyModel


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def energy_joules(components) -> float:
    return sum(metric("incar_energy_joules_total", component=c) for c in components)


def sentry_car(config: PowerConfig, person_between=(40.0, 60.0)) -> SimCar:
    cameras = [SimCamera(p, "sentinel") for p in ("front", "rear", "left", "right")]
    cameras[0].person_between = person_between
    return SimCar(config, cameras, mode="sentry", active_skills=("sentinel",))


def test_sixty_second_sentry_holds_the_budget_and_keeps_watching():
    config = PowerConfig()
    budget = config.budgets.power_watts["sentry"]
    car = sentry_car(config)
    components = list(config.backends["qnn-htp"])
    joules_before = energy_joules(components)
    decisions_before = metric("incar_governor_decisions_total", action="step_down")

    car.run(60.0)

    average = (energy_joules(components) - joules_before) / 60.0
    assert average == pytest.approx(car.energy_joules / 60.0)
    assert average < budget, f"modelled average {average:.2f} W over the {budget} W sentry budget"
    # It had to act: at full performance this scene costs more than the budget.
    assert car.decisions_at_level_zero_watts > budget
    assert car.governor.level > 0
    assert metric("incar_governor_decisions_total", action="step_down") > decisions_before
    assert metric("incar_governor_level") == car.governor.level
    # Settled, not flapping: the last half minute at one level.
    assert len(set(car.levels[-30:])) == 1
    # The person approaching the front camera (40-60 s) is still put through the person detector, often.
    front = car.cameras["front"]
    floor = config.governor.floor_fps["sentinel"]
    assert len(front.detector_runs_with_person) >= floor * 20 * 0.9
    assert front.detector_runs_with_person[0] < 40.0 + 1.0
    assert metric("incar_camera_analysis_rate_fps", camera="front") == front.fps >= floor


def test_an_impossible_budget_never_takes_the_person_detector_below_its_floor():
    config = PowerConfig()
    config.budgets.power_watts["sentry"] = 1.0     # below the always-on rails: cannot be met
    car = sentry_car(config)
    violations_before = metric("incar_power_budget_violations_total", mode="sentry")
    car.run(60.0)
    assert car.governor.level == len(config.governor.levels) - 1
    rates = [fps for kind, _, fps in (c for c in car.hook_calls if c[0] == "rate")]
    depths = [d for kind, _, d in (c for c in car.hook_calls if c[0] == "depth")]
    assert min(rates) == config.governor.floor_fps["sentinel"]
    assert min(depths) == config.governor.floor_stages["sentinel"]
    assert ("htp", "extreme_power_saver") in car.hook_calls
    assert len(car.cameras["front"].detector_runs_with_person) >= 2.0 * 20 * 0.9
    # The miss is visible: violations counted.
    assert metric("incar_power_budget_violations_total", mode="sentry") > violations_before


def safety_car(config: PowerConfig) -> SimCar:
    cameras = [SimCamera("front", "sentinel"), SimCamera("rear", "sentinel"),
               SimCamera("left", "safety"), SimCamera("right", "safety")]
    return SimCar(config, cameras, mode="parked_awake", active_skills=("safety", "sentinel"))


def test_safety_keeps_its_latency_budget_while_sentry_analysis_runs():
    config = PowerConfig()
    config.budgets.power_watts["parked_awake"] = 3.5     # tight: the governor wants to save
    budget = config.budgets.latency_seconds["safety"]
    violations_before = metric("incar_latency_budget_violations_total", skill="safety")
    car = safety_car(config)
    car.run(60.0)
    latencies = car.latencies["safety"]
    assert len(latencies) >= 2 * 10 * 60 * 0.9          # both safety cameras analysed at >= their floor
    assert max(latencies) <= budget
    assert metric("incar_latency_budget_violations_total", skill="safety") == violations_before
    assert car.governor.level > 0                        # it still saved what it could
    assert car.latencies["sentinel"], "sentry analysis kept running alongside"


def test_without_the_latency_guard_the_same_scene_breaks_safetys_budget():
    """The control for the test above: the guard is what keeps Safety inside its budget."""
    config = PowerConfig()
    config.budgets.power_watts["parked_awake"] = 3.5
    config.governor.latency_guard_skills = []
    car = safety_car(config)
    car.run(60.0)
    assert max(car.latencies["safety"]) > config.budgets.latency_seconds["safety"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_leaving_sentry_resets_to_full_performance_and_a_failing_hook_does_not_stop_it():
    clock, ledger = Clock(), BusyLedger()
    config = PowerConfig()
    source = EnergyModel.for_backend(config, "qnn-htp", ledger=ledger, clock=clock)
    budgets = BudgetTracker(BudgetsConfig(), clock=clock)

    def broken(camera_id, fps):
        raise RuntimeError("camera gone")

    modes = []
    governor = Governor(GovernorConfig(), source, budgets, clock=clock, set_analysis_rate=broken,
                        set_htp_performance_mode=modes.append)
    governor.add_camera("front", 15.0)
    parked = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True)
    assert budgets.update_vehicle(parked, sentry_armed=True) == "sentry"
    for _ in range(20):              # a busy NPU: 100 % at burst, far over 5 W
        clock.now += 1.0
        ledger.add("npu", 1.0)
        governor.tick()
    assert governor.level >= 2 and modes[-1] != "burst"
    driving = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_DRIVE, speed_kmh=50, ignition=vehicle_pb2.IGNITION_ON)
    assert budgets.update_vehicle(driving, sentry_armed=True) == "driving"
    clock.now += 1.0
    decision = governor.tick()
    assert (decision.action, governor.level, modes[-1]) == ("mode_reset", 0, "burst")


@pytest.mark.parametrize("gear,speed,ignition,locked,armed,mode", [
    (vehicle_pb2.GEAR_DRIVE, 40.0, vehicle_pb2.IGNITION_ON, False, False, "driving"),
    (vehicle_pb2.GEAR_PARK, 0.0, vehicle_pb2.IGNITION_ON, False, False, "parked_awake"),
    (vehicle_pb2.GEAR_PARK, 0.0, vehicle_pb2.IGNITION_OFF, True, True, "sentry"),
    (vehicle_pb2.GEAR_PARK, 0.0, vehicle_pb2.IGNITION_OFF, True, False, "off"),
    (vehicle_pb2.GEAR_PARK, 0.0, vehicle_pb2.IGNITION_OFF, False, True, "off"),
])
def test_vehicle_mode(gear, speed, ignition, locked, armed, mode):
    state = vehicle_pb2.VehicleState(gear=gear, speed_kmh=speed, ignition=ignition, locked=locked)
    assert mode_of(state, armed) == mode


def test_budget_tracker_windows_power_and_counts_latency_violations():
    clock = Clock()
    budgets = BudgetTracker(BudgetsConfig(power_window_seconds=10.0), clock=clock)
    budgets.set_mode("sentry")
    before = metric("incar_power_budget_violations_total", mode="sentry")
    for watts in (4.0, 4.0, 4.0, 9.0):
        clock.now += 1.0
        over = budgets.observe_power(watts, 1.0)
    assert budgets.average_power() == pytest.approx(5.25) and over
    assert metric("incar_power_budget_violations_total", mode="sentry") == before + 1
    clock.now += 20.0                  # the window slides past the spike
    assert not budgets.observe_power(3.0, 1.0)
    lat_before = metric("incar_latency_budget_violations_total", skill="greeter")
    assert not budgets.observe_latency("greeter", 1.0)
    assert budgets.observe_latency("greeter", 1.6)
    assert metric("incar_latency_budget_violations_total", skill="greeter") == lat_before + 1
    assert budgets.worst_recent_latency("greeter", 5.0) == 1.6
    assert metric("incar_power_budget_watts", mode="sentry") == 5.0
    with pytest.raises(ValueError, match="unknown 'camping'"):
        budgets.set_mode("camping")
    with pytest.raises(ValueError, match="latency for greeter"):
        budgets.observe_latency("greeter", -0.1)
