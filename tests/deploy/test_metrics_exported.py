"""Every metric the dashboard and the alert rules use is really exported.

Two views: the metric-defining modules of the service (imported here, the names collected from the registry)
must export all of them; and a real `incar serve` process must serve, on its metrics port, the ones of the
parts it already wires.
"""
from __future__ import annotations

import importlib
import urllib.request

from tests.conftest import ServerProcess, free_port
from tests.deploy.deploy_files import deploy_metric_names, exported_names, metric_defining_modules
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families


def test_every_deploy_metric_is_registered_by_the_code():
    modules = metric_defining_modules()
    assert "service.power.governor" in modules and "service.telemetry.metrics" in modules
    for module in modules:
        importlib.import_module(module)
    exported = exported_names(REGISTRY.collect())
    used = deploy_metric_names()
    assert len(used) >= 15
    missing = sorted(used - exported)
    assert not missing, f"deploy/ uses metrics no code exports: {missing}"


def test_a_real_server_serves_the_deploy_metrics(tmp_path):
    metrics_port = free_port()
    server = ServerProcess(tmp_path, ["--set", f"server.metrics_listen=127.0.0.1:{metrics_port}"]).start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server.terminate()
    served = exported_names(text_string_to_metric_families(text))
    used = deploy_metric_names()
    # Every panel and alert reads a series a running service really serves (families are served from the start,
    # before their first sample: a dashboard query then says 0, not "no data").
    missing = sorted(used - served)
    assert not missing, f"`incar serve` does not serve {len(missing)} deploy metrics: {', '.join(missing)}"
