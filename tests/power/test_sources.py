"""Power sources against a fake sysfs tree (real files, sysfs units) and the energy model's arithmetic."""
from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from service.config import ConfigError, load_config
from service.power.config import ComponentPower, HtpModeModel, PowerConfig
from service.power.sources import (BusyLedger, EnergyModel, SysfsPowerSource, create_power_source,
                                   discover_sensors, record_busy)


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def write(path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "class"
    # An INA3221-style chip with power channels (µW) and labels.
    write(root / "hwmon/hwmon0/name", "ina3221")
    write(root / "hwmon/hwmon0/power1_input", 2_500_000)
    write(root / "hwmon/hwmon0/power1_label", "VDD_NPU")
    write(root / "hwmon/hwmon0/power2_input", 1_250_000)
    # A chip with only voltage (mV) and current (mA) channels: in1 pairs with curr1, in0 has no current.
    write(root / "hwmon/hwmon1/name", "pmic")
    write(root / "hwmon/hwmon1/in0_input", 900)
    write(root / "hwmon/hwmon1/in1_input", 12_000)
    write(root / "hwmon/hwmon1/curr1_input", 250)
    write(root / "hwmon/hwmon1/curr1_label", "VBAT")
    # A temperature-only chip contributes nothing.
    write(root / "hwmon/hwmon2/name", "cpu_thermal")
    write(root / "hwmon/hwmon2/temp1_input", 45_000)
    # Power supplies: one reports power_now (µW), a battery reports voltage and a negative (discharging) current.
    write(root / "power_supply/usb/power_now", 5_000_000)
    write(root / "power_supply/battery/voltage_now", 12_600_000)
    write(root / "power_supply/battery/current_now", -400_000)
    return root


def test_discovers_every_power_sensor_in_sysfs_units(sysfs):
    sensors = {s.key: s.read() for s in discover_sensors(sysfs)}
    assert sensors == {
        "hwmon:ina3221/VDD_NPU": pytest.approx(2.5),
        "hwmon:ina3221/power2": pytest.approx(1.25),
        "hwmon:pmic/VBAT": pytest.approx(3.0),
        "power_supply:battery": pytest.approx(5.04),
        "power_supply:usb": pytest.approx(5.0),
    }


def test_sysfs_source_samples_watts_and_counts_joules(sysfs):
    clock = Clock()
    source = SysfsPowerSource(discover_sensors(sysfs), clock=clock)
    before = REGISTRY.get_sample_value("incar_energy_joules_total", {"component": "hwmon:ina3221/VDD_NPU"}) or 0.0
    clock.now += 4.0
    reading = source.sample()
    assert reading.interval == 4.0
    assert reading.total_watts == pytest.approx(2.5 + 1.25 + 3.0 + 5.04 + 5.0)
    after = REGISTRY.get_sample_value("incar_energy_joules_total", {"component": "hwmon:ina3221/VDD_NPU"})
    assert after - before == pytest.approx(10.0)
    assert REGISTRY.get_sample_value("incar_power_watts", {"component": "hwmon:pmic/VBAT"}) == pytest.approx(3.0)
    assert REGISTRY.get_sample_value("incar_power_total_watts") == pytest.approx(reading.total_watts)


def test_unreadable_sensor_is_left_out_not_fatal(sysfs):
    clock = Clock()
    source = SysfsPowerSource(discover_sensors(sysfs), clock=clock)
    (sysfs / "hwmon/hwmon0/power1_input").write_text("garbage\n")
    clock.now += 1
    reading = source.sample()
    assert "hwmon:ina3221/VDD_NPU" not in reading.watts
    assert reading.watts["hwmon:ina3221/power2"] == pytest.approx(1.25)


def test_auto_prefers_sensors_and_falls_back_to_the_model(sysfs, tmp_path):
    assert create_power_source(PowerConfig(sysfs_root=str(sysfs)), "qnn-htp").name == "sysfs"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert isinstance(create_power_source(PowerConfig(sysfs_root=str(empty)), "qnn-htp"), EnergyModel)
    with pytest.raises(ValueError, match="no power sensors"):
        create_power_source(PowerConfig(source="sysfs", sysfs_root=str(empty)), "qnn-htp")
    with pytest.raises(ValueError, match="hwmon:nope/x"):
        create_power_source(PowerConfig(source="sysfs", sysfs_root=str(sysfs), sysfs_sensors=["hwmon:nope/x"]),
                            "qnn-htp")
    picked = create_power_source(PowerConfig(sysfs_root=str(sysfs), sysfs_sensors=["hwmon:pmic/VBAT"]), "cpu")
    assert [s.key for s in picked.sensors] == ["hwmon:pmic/VBAT"]


def test_energy_model_turns_busy_time_into_watts():
    clock, ledger = Clock(), BusyLedger()
    model = EnergyModel({"soc": ComponentPower(1.0, 1.0), "cpu": ComponentPower(0.5, 4.5, capacity=2.0),
                         "npu": ComponentPower(0.1, 5.1)},
                        {"burst": HtpModeModel(1.0, 1.0), "power_saver": HtpModeModel(0.4, 0.2)},
                        ledger=ledger, clock=clock)
    clock.now += 10.0
    ledger.add("cpu", 5.0)      # 5 of 20 core-seconds
    ledger.add("npu", 2.5)      # 25 %
    reading = model.sample()
    assert reading.watts == pytest.approx({"soc": 1.0, "cpu": 0.5 + 4.0 * 0.25, "npu": 0.1 + 5.0 * 0.25})
    model.set_performance_mode("power_saver")
    assert model.npu_clock == 0.4
    clock.now += 10.0
    ledger.add("npu", 20.0)     # more busy time than wall time: capped at 100 %
    reading = model.sample()
    assert reading.watts["npu"] == pytest.approx(0.1 + 5.0 * 0.2)
    assert reading.watts["cpu"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not modelled"):
        model.set_performance_mode("turbo")


def test_record_busy_feeds_the_process_ledger_and_rejects_nonsense():
    clock = Clock()
    model = EnergyModel.for_backend(PowerConfig(), "qnn-htp", clock=clock)
    before = REGISTRY.get_sample_value("incar_component_busy_seconds_total", {"component": "npu"}) or 0.0
    record_busy("npu", 0.5)
    clock.now += 1.0
    watts = model.sample().watts
    npu = PowerConfig().backends["qnn-htp"]["npu"]
    assert watts["npu"] == pytest.approx(npu.idle_watts + (npu.active_watts - npu.idle_watts) * 0.5)
    assert REGISTRY.get_sample_value("incar_component_busy_seconds_total", {"component": "npu"}) - before == 0.5
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="seconds"):
            record_busy("npu", bad)
    with pytest.raises(ValueError, match="no energy model for backend 'tpu'"):
        EnergyModel.for_backend(PowerConfig(), "tpu")


def test_power_config_through_the_service_config_with_clear_errors():
    config = load_config(env={}, overrides=["power.budgets.power_watts.sentry=4.5",
                                            "power.governor.floor_fps.sentinel=3"])
    assert config.power.budgets.power_watts == {"driving": 25.0, "parked_awake": 12.0, "sentry": 4.5, "off": 1.5}
    assert config.power.governor.floor_fps["sentinel"] == 3.0
    cases = {
        "power.source=battery": "power.source",
        "power.budgets.power_watts.sentry=0": "power.budgets.power_watts.sentry",
        "power.budgets.power_watts.camping=3": "camping: unknown vehicle mode",
        "power.governor.step_up_ratio=0.99": "step_up_ratio",
        "power.budgets.latency_seconds.safety=-1": "latency_seconds.safety",
        "power.backends.cpu.npu.active_watts=-1": "active_watts",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(env={}, overrides=[override])
