"""Acceptance: 60 simulated seconds of sentry hold the power budget (read from the metrics) while a person
approaching the car still raises a Sentinel Alert.

The simulated car decides which frames reach the person detector at the rates and depths the governor sets;
the real Sentinel skill (with a real database and event log) judges the detector's output on those frames.
"""
from __future__ import annotations

import numpy as np
from prometheus_client import REGISTRY

from incar.v1 import common_pb2, vehicle_pb2
from tests.power.power_simulation import SimCamera, SimCar
from service.perception.types import Detection, FrameAnalysis
from service.power.config import PowerConfig
from service.store.db import Database
from service.store.events import EventLog
from skills.base import SkillContext, TemplateNarrator
from skills.sentinel import Sentinel

APPEARS, ARRIVES = 40.0, 55.0     # the person enters the front camera's view, then reaches the car


def person_box(elapsed: float, size: int = 768) -> tuple[float, float, float, float]:
    """Walking straight at the camera: the box grows from 15 % to 95 % of the frame height."""
    tall = 0.15 + 0.80 * min(max((elapsed - APPEARS) / (ARRIVES - APPEARS), 0.0), 1.0)
    height = tall * size
    return (size / 2 - height / 5, size - height, size / 2 + height / 5, float(size))


def joules(components) -> float:
    return sum(REGISTRY.get_sample_value("incar_energy_joules_total", {"component": c}) or 0.0 for c in components)


async def test_sentry_minute_under_budget_and_the_approaching_person_raises_an_alert(tmp_path):
    config = PowerConfig()
    budget = config.budgets.power_watts["sentry"]
    cameras = [SimCamera(p, "sentinel") for p in ("front", "rear", "left", "right")]
    cameras[0].person_between = (APPEARS, 60.0)
    car = SimCar(config, cameras, mode="sentry", active_skills=("sentinel",))
    components = list(config.backends["qnn-htp"])
    before = joules(components)
    car.run(60.0)
    average = (joules(components) - before) / 60.0
    assert average < budget
    assert car.governor.level > 0

    clock = car.clock
    db = Database(tmp_path / "incar.db")
    events = EventLog(db)
    sentinel = Sentinel(SkillContext(db=db, events=events, narrator=TemplateNarrator(), data_dir=tmp_path,
                                     clock=clock))
    db.migrate()
    parked = vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF, locked=True,
                                      battery_percent=80.0)
    previous, sentinel.vehicle = sentinel.vehicle, parked
    await sentinel.on_vehicle(previous, parked)
    assert sentinel.armed

    frame = np.zeros((768, 768, 3), np.uint8)
    for captured, done, person in cameras[0].detector_runs:
        clock.now = done
        detections = (Detection("person", 0.9, person_box(captured - car.t0)),) if person else ()
        await sentinel.on_frame(FrameAnalysis("front", "exterior", "front", captured, frame,
                                              detections=detections, stages_run=("motion", "objects")))
    await sentinel.drain()
    alerts = [e for e in events.after(0, 100, ["sentinel.alert", "sentinel.alarm"])]
    assert alerts, f"no Sentinel alert; state {sentinel.state}, governor levels {car.levels}"
    alert = alerts[0]
    assert alert.kind == "sentinel.alert" and alert.severity == common_pb2.SEVERITY_WARNING
    assert alert.camera_id == "front"
    db.close()
