"""The wiring object: config in, the governor loop running on an asyncio task, mode from the vehicle."""
from __future__ import annotations

import asyncio

from incar.v1 import vehicle_pb2
from service.power.config import PowerConfig
from service.power.manager import PowerManager
from service.power.sources import record_busy
from service.store.db import Database
from service.vehicle import VehicleStateStore, vehicle_mode


async def test_manager_follows_the_vehicle_and_governs_on_its_own_loop(tmp_path):
    db = Database(tmp_path / "incar.db")
    vehicle = VehicleStateStore(db)
    db.migrate()
    armed = {"value": True}
    empty = tmp_path / "no-sensors"
    empty.mkdir()
    config = PowerConfig(sysfs_root=str(empty))
    config.governor.period_seconds = 0.05
    config.governor.settle_seconds = 0.0
    rates, modes = {}, []
    manager = PowerManager(config, "qnn-htp", mode_provider=lambda: vehicle_mode(vehicle.current, armed["value"]),
                           set_analysis_rate=lambda cam, fps: rates.__setitem__(cam, fps),
                           set_htp_performance_mode=modes.append)
    assert manager.source.name == "model"
    manager.governor.add_camera("front", 15.0, purposes=("sentinel", "safety"))
    vehicle.update(vehicle_pb2.VehicleState(gear=vehicle_pb2.GEAR_PARK, ignition=vehicle_pb2.IGNITION_OFF,
                                            locked=True))
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop))
    for _ in range(40):                      # keep the NPU fully busy: far over the sentry budget
        record_busy("npu", 0.05)
        record_busy("cpu", 0.1)
        await asyncio.sleep(0.05)
        if manager.governor.level >= 3:
            break
    assert manager.budgets.mode == "sentry"
    assert manager.governor.level >= 3 and modes[-1] != "burst"
    # Sentry: Safety is not needed, so only the Sentinel floor holds the front camera.
    assert rates["front"] == max(15.0 * config.governor.levels[manager.governor.level].rate_scale,
                                 config.governor.floor_fps["sentinel"])
    armed["value"] = False                   # disarmed: the mode becomes "off" on the next tick
    await asyncio.sleep(0.15)
    assert manager.budgets.mode == "off"
    stop.set()
    await asyncio.wait_for(task, 2)
    db.close()
