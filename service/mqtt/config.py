"""The `mqtt` section: broker, topics, TLS and credentials, what is published and which commands come in."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_TOPIC_PART = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


@dataclass
class MqttConfig:
    enabled: bool = False               # `make run` and the compose file turn it on
    host: str = "127.0.0.1"
    port: int = 1883
    vehicle_id: str = "car"             # topics: <topic_prefix>/<vehicle_id>/...
    topic_prefix: str = "incar"
    client_id: str = ""                 # "" -> incar-<vehicle_id>
    qos: int = 1
    keepalive_s: int = 30
    publish_timeout_s: float = 10.0     # no PUBACK by then: the connection is treated as lost, nothing advances
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 15.0
    batch: int = 32                     # messages in flight at once; the outbox cursor advances per batch
    username: str = ""
    password: str = ""                  # or INCAR_MQTT__PASSWORD; prefer password_file
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""                   # CA of the broker's certificate ("" with tls: the system's CAs)
    cert_file: str = ""                 # client certificate, when the broker asks for one
    key_file: str = ""
    event_kinds: list[str] = field(default_factory=list)   # prefixes to publish; empty: every event
    # Owner notifications count as delivered (acknowledged DONE) once the broker has them (PUBACK).
    acknowledge_notifications: bool = True
    # Commands in (arm/disarm Sentinel). Each command carries a bearer token whose role must be allowed the
    # matching gRPC method (security.tokens), exactly as on the gRPC API.
    commands: bool = False
    # Development and `make run` only: start a Mosquitto child on host:port (the compose file runs its own broker).
    local_broker: bool = False

    def validate(self) -> None:
        if not self.host:
            raise ValueError("host: required")
        if not 0 < self.port < 65536:
            raise ValueError(f"port: expected 1..65535, got {self.port}")
        for key in ("vehicle_id", "topic_prefix"):
            if not _TOPIC_PART.match(getattr(self, key)):
                raise ValueError(f"{key}: letters, digits, '_', '-' and '/' between parts only "
                                 f"(no MQTT wildcards), got {getattr(self, key)!r}")
        if self.qos not in (1, 2):
            raise ValueError(f"qos: 1 or 2 (the outbox needs the broker's acknowledgement), got {self.qos}")
        for key in ("keepalive_s", "publish_timeout_s", "reconnect_min_s", "reconnect_max_s", "batch"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_min_s")
        for key in ("password_file", "ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ValueError(f"{key}: {path} is not a readable file")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file: a client certificate needs its key_file (and the other way round)")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("tls: set tls=true to use ca_file / cert_file")
        if self.password and self.password_file:
            raise ValueError("password: give password or password_file, not both")

    def secret(self) -> str | None:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password or None

    @property
    def base_topic(self) -> str:
        return f"{self.topic_prefix}/{self.vehicle_id}"
