"""The service container may run the safety lane at its priority (service/thread_priority.py) and selects the
x86 int8 detector: checked statically, as the other compose checks (no Docker engine runs here)."""
from __future__ import annotations

from service.thread_priority import REALTIME_PRIORITY, SAFETY_BOOST
from tests.deploy.deploy_files import compose
from tests.deploy.test_compose import env


def test_the_service_container_may_raise_the_safety_lane():
    incar = compose()["services"]["incar"]
    assert "SYS_NICE" in incar.get("cap_add", [])
    limits = incar["ulimits"]
    # RLIMIT_RTPRIO is the highest SCHED_FIFO priority allowed; RLIMIT_NICE allows nice down to 20 - limit.
    assert limits["rtprio"] >= REALTIME_PRIORITY
    assert 20 - limits["nice"] <= -SAFETY_BOOST
    for other in ("camera-sim", "hmi"):   # only the service runs a safety lane
        assert "SYS_NICE" not in compose()["services"][other].get("cap_add", [])


def test_the_service_container_runs_the_int8_detector_on_its_cpu_backend():
    from service.config import load_config
    config = load_config(env=env(compose()["services"]["incar"]))
    assert config.runtime.backend == "cpu" and config.perception.backend == "cpu"
    assert config.perception.variant == "cpu-int8" and config.perception.resolved_variant == "cpu-int8"
