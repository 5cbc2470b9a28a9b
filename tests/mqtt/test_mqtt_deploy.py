"""The compose file's broker: Debian's Mosquitto, on the service's loopback, where the service's config points."""
from __future__ import annotations

from service.config import load_config
from tests.deploy.deploy_files import DEPLOY, compose


def test_compose_runs_a_debian_mosquitto_where_the_service_publishes():
    services = compose()["services"]
    mqtt, incar = services["mqtt"], services["incar"]
    assert mqtt["network_mode"] == "service:incar" and "ports" not in mqtt
    dockerfile = (DEPLOY / mqtt["build"]["context"] / "Dockerfile").read_text()
    assert "apt-get install" in dockerfile and " mosquitto" in dockerfile
    conf = (DEPLOY / "mqtt" / "mosquitto.conf").read_text().splitlines()
    listener = next(line.split() for line in conf if line.startswith("listener "))
    config = load_config(env={k: str(v) for k, v in incar["environment"].items()})
    assert config.mqtt.enabled and (listener[2], int(listener[1])) == (config.mqtt.host, config.mqtt.port)
    assert "persistence true" in conf
