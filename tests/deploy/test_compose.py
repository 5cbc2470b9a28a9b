"""Static checks of deploy/: no Docker engine runs here, so the files are checked for what would break `up`."""
from __future__ import annotations

import re

import pytest
from tests.deploy.deploy_files import DEPLOY, alert_rules, compose, dashboard_exprs, dashboards, load_yaml

SERVICES = {"incar", "camera-sim", "hmi", "mqtt", "prometheus", "grafana"}


def env(service: dict) -> dict:
    value = service.get("environment", {})
    return value if isinstance(value, dict) else dict(item.split("=", 1) for item in value)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def published(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def option(command: list[str], flag: str) -> str:
    for i, arg in enumerate(command):
        if arg == flag:
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {command}")


def test_compose_services_namespaces_and_dependencies():
    spec = compose()
    services = spec["services"]
    assert set(services) == SERVICES
    incar = services["incar"]
    assert incar["build"]["context"] == ".." and (DEPLOY / ".." / incar["build"]["dockerfile"]).is_file()
    listen = env(incar)["INCAR_SERVER__LISTEN"]
    for name, service in services.items():
        mode = service.get("network_mode", "")
        if mode:
            owner = mode.removeprefix("service:")
            assert owner in services and owner != name, f"{name}: network_mode {mode}"
            assert "ports" not in service, f"{name} shares {owner}'s namespace: publish on {owner}"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no check"
    for name, flag in (("camera-sim", "--cameras-only"), ("hmi", "--hmi-only")):
        command = services[name]["command"]
        assert command[0] == "sim" and flag in command
        assert option(command, "--target") == listen, f"{name} must reach the service where it listens"
        assert services[name]["network_mode"] == "service:incar"
        assert services[name]["image"] == incar["image"]
    health = incar["healthcheck"]["test"]
    assert health[:3] == ["CMD", "incar", "health"] and option(health, "--target") == listen


def test_volumes_are_declared_and_bind_sources_exist():
    spec = compose()
    declared = set(spec.get("volumes") or {})
    used = set()
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert target.startswith("/"), f"{name}: {volume}"
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: named volume {source} not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"
    images = list((DEPLOY / "sim" / "images").glob("*.jpg"))
    assert len(images) >= 2, "the camera simulator needs images to replay"


def mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/) for bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def test_prometheus_scrapes_the_service_metrics_port_and_loads_its_rules():
    services = compose()["services"]
    prom = services["prometheus"]
    config = load_yaml("prometheus/prometheus.yml")
    binds = mounts(prom)
    config_path = option(prom["command"], "--config.file")
    assert binds[config_path] == "./prometheus/prometheus.yml"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    incar_targets = [t for sc in jobs["incar"]["static_configs"] for t in sc["targets"]]
    metrics_listen = env(services["incar"])["INCAR_SERVER__METRICS_LISTEN"]
    # Same network namespace: Prometheus reaches the loopback-only endpoint at the very address it binds.
    assert prom["network_mode"] == "service:incar" and incar_targets == [metrics_listen]
    web_port = port_of(option(prom["command"], "--web.listen-address"))
    assert [port_of(t) for sc in jobs["prometheus"]["static_configs"] for t in sc["targets"]] == [web_port]
    assert web_port in published(services["incar"])
    for rule_file in config["rule_files"]:
        assert rule_file in binds, f"rule file {rule_file} is not mounted"
        assert (DEPLOY / binds[rule_file]).is_file()
    assert config["global"]["scrape_interval"].endswith("s")


DURATION = re.compile(r"^\d+[smhd]$")


def test_alert_rules_are_complete_and_reference_real_jobs():
    jobs = {job["job_name"] for job in load_yaml("prometheus/prometheus.yml")["scrape_configs"]}
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules) >= 5
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert DURATION.match(rule["for"]), rule["alert"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), rule["alert"]
        referenced = set(re.findall(r'job="([^"]+)"', expr))
        assert referenced and referenced <= jobs, f"{rule['alert']}: job {referenced - jobs} is not scraped"


def test_grafana_datasource_and_dashboard_provisioning_line_up():
    services = compose()["services"]
    grafana = services["grafana"]
    binds = mounts(grafana)
    assert binds["/etc/grafana/provisioning"] == "./grafana/provisioning"
    sources = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    url = sources[0]["url"]
    host, port = re.match(r"^http://([^:/]+):(\d+)$", url).groups()
    web_port = port_of(option(services["prometheus"]["command"], "--web.listen-address"))
    # Prometheus runs in the incar service's namespace: its address is that service's name.
    assert services["prometheus"]["network_mode"] == f"service:{host}" and int(port) == web_port
    providers = load_yaml("grafana/provisioning/dashboards/incar.yml")["providers"]
    path = providers[0]["options"]["path"]
    assert binds[path] == "./grafana/dashboards"
    assert env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(path + "/")
    uid = sources[0]["uid"]
    for name, board in dashboards().items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid, f"{name}/{panel['title']}: unknown datasource"
            assert panel["targets"], f"{name}/{panel['title']}: no queries"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid
    titles = " | ".join(p["title"].lower() for b in dashboards().values() for p in b["panels"])
    for needed in ("latency", "budget", "power", "camera fps", "drops", "placement"):
        assert needed in titles, f"dashboard lacks a {needed!r} panel"


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_queries_are_balanced_and_scoped_to_the_job(expr):
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
    assert 'job="incar"' in expr


def test_the_service_accepts_the_compose_and_image_environment():
    from tests.deploy.deploy_files import ROOT
    from service.config import load_config
    incar_env = env(compose()["services"]["incar"])
    image_env = {}
    for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            image_env.update(re.findall(r"(INCAR_[A-Z_]+)=(\S+)", line))
    config = load_config(env={**image_env, **incar_env})
    assert config.server.metrics_listen == incar_env["INCAR_SERVER__METRICS_LISTEN"]
    assert config.runtime.bundle.startswith("/opt/incar/models/")


def test_the_commands_compose_runs_exist_with_those_flags():
    import subprocess
    import sys
    from tests.deploy.deploy_files import ROOT
    services = compose()["services"]
    commands = [services[name]["command"] for name in ("incar", "camera-sim", "hmi")]
    commands.append(services["incar"]["healthcheck"]["test"][2:])
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "service.cli", command[0], "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for flag in (arg for arg in command[1:] if arg.startswith("--")):
            assert flag in result.stdout, f"`incar {command[0]}` has no {flag}"
