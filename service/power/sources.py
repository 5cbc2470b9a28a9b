"""Where the watts come from: Linux power sensors when the board has them, else an energy model.

Both feed the same metrics: `incar_power_watts{component}` (the last sample), `incar_power_total_watts`, and
`incar_energy_joules_total{component}`. Busy time is reported by whoever keeps a component busy
(`record_busy("npu", seconds)` from the runtime, `"cpu"` from perception, `"cameras"` from decode) into one
process-wide ledger; the energy model turns it into watts, and it is exported either way.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import Counter, Gauge

from service.power.config import ComponentPower, HtpModeModel, PowerConfig

log = structlog.get_logger(__name__)

POWER_WATTS = Gauge("incar_power_watts", "Power per component over the last sample", ["component"])
POWER_TOTAL_WATTS = Gauge("incar_power_total_watts", "Whole-service power over the last sample")
ENERGY_JOULES = Counter("incar_energy_joules_total", "Energy used per component", ["component"])
BUSY_SECONDS = Counter("incar_component_busy_seconds_total", "Busy time reported per component", ["component"])
SOURCE_INFO = Gauge("incar_power_source_info", "Which power source is in use (1)", ["source"])


class BusyLedger:
    """Thread-safe running totals of busy seconds per component; readers keep their own cursor."""

    def __init__(self):
        self._lock = threading.Lock()
        self._totals: dict[str, float] = {}

    def add(self, component: str, seconds: float) -> None:
        if not component:
            raise ValueError("component: empty name")
        if not seconds >= 0:   # also rejects NaN
            raise ValueError(f"seconds: expected >= 0, got {seconds!r}")
        with self._lock:
            self._totals[component] = self._totals.get(component, 0.0) + seconds
        BUSY_SECONDS.labels(component).inc(seconds)

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)


LEDGER = BusyLedger()


def record_busy(component: str, seconds: float) -> None:
    """Report that `component` ("npu", "cpu", "cameras", ...) was busy for `seconds`. Cheap; any thread."""
    LEDGER.add(component, seconds)


@dataclass(frozen=True)
class PowerReading:
    time: float                      # clock seconds at the end of the sample
    interval: float                  # seconds the sample covers
    watts: dict[str, float]          # per component

    @property
    def total_watts(self) -> float:
        return sum(self.watts.values())


class PowerSource:
    """A sampler: each `sample()` covers the time since the previous one and updates the metrics."""

    name = "abstract"

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._last = clock()
        self.last_reading: PowerReading | None = None

    def sample(self) -> PowerReading:
        now = self.clock()
        interval = max(now - self._last, 0.0)
        self._last = now
        watts = self._measure(interval)
        reading = PowerReading(now, interval, watts)
        for component, w in watts.items():
            POWER_WATTS.labels(component).set(w)
            if interval > 0:
                ENERGY_JOULES.labels(component).inc(w * interval)
        POWER_TOTAL_WATTS.set(reading.total_watts)
        self.last_reading = reading
        return reading

    def set_performance_mode(self, mode: str) -> None:
        """Sensors see the effect themselves; the model overrides this."""

    def _measure(self, interval: float) -> dict[str, float]:
        raise NotImplementedError


class EnergyModel(PowerSource):
    """watts = idle + (active - idle) * busy fraction, per component of the backend in use.

    The NPU's active watts scale with the HTP performance mode the governor picks.
    """

    name = "model"

    def __init__(self, components: dict[str, ComponentPower], htp_modes: dict[str, HtpModeModel] | None = None,
                 *, ledger: BusyLedger = LEDGER, clock: Callable[[], float] = time.monotonic,
                 performance_mode: str = "burst"):
        if not components:
            raise ValueError("components: the energy model needs at least one")
        self.components = dict(components)
        self.htp_modes = dict(htp_modes or {"burst": HtpModeModel()})
        self.ledger = ledger
        self._seen = ledger.totals()
        self.performance_mode = ""
        self.set_performance_mode(performance_mode)
        super().__init__(clock)

    @classmethod
    def for_backend(cls, config: PowerConfig, backend: str, **kwargs) -> EnergyModel:
        if backend not in config.backends:
            raise ValueError(f"power.backends: no energy model for backend {backend!r} "
                             f"(known: {', '.join(sorted(config.backends))})")
        return cls(config.backends[backend], config.htp_modes, **kwargs)

    def set_performance_mode(self, mode: str) -> None:
        if mode not in self.htp_modes:
            raise ValueError(f"htp performance mode {mode!r}: not modelled (known: {', '.join(self.htp_modes)})")
        self.performance_mode = mode

    @property
    def npu_clock(self) -> float:
        """Relative NPU speed in the current mode (1.0 = burst): inference time scales by 1/clock."""
        return self.htp_modes[self.performance_mode].clock

    def _measure(self, interval: float) -> dict[str, float]:
        totals = self.ledger.totals()
        busy = {k: v - self._seen.get(k, 0.0) for k, v in totals.items()}
        self._seen = totals
        out = {}
        for name, comp in self.components.items():
            active = comp.active_watts
            if name == "npu":
                active = comp.idle_watts + (active - comp.idle_watts) * self.htp_modes[self.performance_mode].power
            if interval <= 0:
                out[name] = comp.idle_watts
                continue
            fraction = min(busy.get(name, 0.0) / (interval * comp.capacity), 1.0)
            out[name] = comp.idle_watts + (active - comp.idle_watts) * fraction
        return out


@dataclass(frozen=True)
class Sensor:
    key: str                         # "hwmon:<chip>/<label>" or "power_supply:<name>"
    read: Callable[[], float]        # watts


def _read_number(path: Path) -> float:
    return float(path.read_text().strip())


def _label(directory: Path, stem: str) -> str:
    label = directory / f"{stem}_label"
    try:
        return label.read_text().strip() or stem
    except OSError:
        return stem


def discover_sensors(root: str | Path) -> list[Sensor]:
    """Power sensors under <root>/hwmon and <root>/power_supply (Linux sysfs units: µW, mV, mA, µV, µA)."""
    root = Path(root)
    sensors: list[Sensor] = []
    for chip in sorted((root / "hwmon").glob("hwmon*")):
        try:
            chip_name = (chip / "name").read_text().strip()
        except OSError:
            chip_name = chip.name
        powers = sorted(chip.glob("power*_input"))
        for p in powers:   # microwatts
            sensors.append(Sensor(f"hwmon:{chip_name}/{_label(chip, p.name[:-6])}",
                                  lambda p=p: _read_number(p) / 1e6))
        if powers:
            continue
        # No power channels: voltage (mV) times current (mA) where the channel numbers pair up.
        for v in sorted(chip.glob("in*_input")):
            index = v.name[2:-6]
            c = chip / f"curr{index}_input"
            if c.exists():
                sensors.append(Sensor(f"hwmon:{chip_name}/{_label(chip, f'curr{index}')}",
                                      lambda v=v, c=c: _read_number(v) * _read_number(c) / 1e6))
    for supply in sorted((root / "power_supply").glob("*")):
        power_now, voltage, current = supply / "power_now", supply / "voltage_now", supply / "current_now"
        key = f"power_supply:{supply.name}"
        if power_now.exists():
            sensors.append(Sensor(key, lambda p=power_now: abs(_read_number(p)) / 1e6))
        elif voltage.exists() and current.exists():
            # current_now is negative while a battery discharges on some drivers; the magnitude is the draw.
            sensors.append(Sensor(key, lambda v=voltage, c=current: abs(_read_number(v) * _read_number(c)) / 1e12))
    return sensors


class SysfsPowerSource(PowerSource):
    """Real readings: each sensor is one component (instantaneous watts at sample time)."""

    name = "sysfs"

    def __init__(self, sensors: list[Sensor], clock: Callable[[], float] = time.monotonic):
        if not sensors:
            raise ValueError("sysfs: no power sensors")
        self.sensors = sensors
        self._failed: set[str] = set()
        super().__init__(clock)

    def _measure(self, interval: float) -> dict[str, float]:
        out = {}
        for sensor in self.sensors:
            try:
                out[sensor.key] = sensor.read()
            except (OSError, ValueError) as exc:
                if sensor.key not in self._failed:   # say it once, not every second
                    log.warning("power.sensor_unreadable", sensor=sensor.key, error=str(exc))
                    self._failed.add(sensor.key)
                continue
            self._failed.discard(sensor.key)
        return out


def create_power_source(config: PowerConfig, backend: str, *, clock: Callable[[], float] = time.monotonic,
                        ledger: BusyLedger = LEDGER) -> PowerSource:
    """The configured source: `auto` uses sysfs sensors when the board has any, else the energy model."""
    sensors: list[Sensor] = []
    if config.source in ("auto", "sysfs"):
        sensors = discover_sensors(config.sysfs_root)
        if config.sysfs_sensors:
            wanted = set(config.sysfs_sensors)
            unknown = wanted - {s.key for s in sensors}
            if unknown and config.source == "sysfs":
                raise ValueError(f"power.sysfs_sensors: not found under {config.sysfs_root}: "
                                 f"{', '.join(sorted(unknown))}")
            sensors = [s for s in sensors if s.key in wanted]
        if config.source == "sysfs" and not sensors:
            raise ValueError(f"power.source: sysfs chosen but no power sensors under {config.sysfs_root}")
    if sensors:
        source: PowerSource = SysfsPowerSource(sensors, clock=clock)
    else:
        source = EnergyModel.for_backend(config, backend, ledger=ledger, clock=clock)
    for name in ("sysfs", "model"):
        SOURCE_INFO.labels(name).set(1 if name == source.name else 0)
    log.info("power.source", source=source.name, backend=backend,
             sensors=[s.key for s in sensors] or None)
    return source
