"""Prometheus metrics of the MQTT link."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from service.telemetry.metrics import PREFIX

CONNECTED = Gauge(f"{PREFIX}mqtt_connected", "1 while connected to the MQTT broker")
CONNECTS = Counter(f"{PREFIX}mqtt_connects_total", "Connection attempts to the broker, by outcome", ["outcome"])
PUBLISHED = Counter(f"{PREFIX}mqtt_published_total", "Messages the broker acknowledged, by source",
                    ["source"])
BACKLOG = Gauge(f"{PREFIX}mqtt_outbox_backlog", "Committed rows not yet acknowledged by the broker (cursor "
                "distance, an upper bound)", ["source"])
COMMANDS = Counter(f"{PREFIX}mqtt_commands_total", "Commands received over MQTT, by command and outcome",
                   ["command", "outcome"])
