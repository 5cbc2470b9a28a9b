"""Transport limits of the gRPC server (the `transport` section): what one client may hold.

Without them a hostile or broken client could open 2,000 streams on one connection, or 1,100 silent TCP
connections that used up the process's file descriptors and locked out every new client and health check.
Each key maps to one grpc core channel argument (docs/reliability.md lists them with their reasons).
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

# Descriptors kept for everything that is not a client connection: SQLite (database, WAL, shm per thread),
# model files, camera sources, the metrics listener, threads' pipes.
RESERVED_DESCRIPTORS = 256


@dataclass
class TransportConfig:
    max_concurrent_streams: int = 100           # per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)
    handshake_timeout_seconds: float = 5.0      # a connection that has not finished its handshake is closed
    max_connections: int = 0                    # 0: the descriptor limit minus RESERVED_DESCRIPTORS
    keepalive_time_seconds: float = 60.0        # the server pings a quiet connection this often ...
    keepalive_timeout_seconds: float = 20.0     # ... and closes it when the ping is not answered in this time
    min_client_ping_interval_seconds: float = 10.0   # clients pinging more often are sent GOAWAY (ping floods)
    max_connection_idle_seconds: float = 300.0  # a connection with no call for this long is closed (GOAWAY)
    max_connection_age_seconds: float = 3600.0  # every connection is rotated after this (GOAWAY) ...
    max_connection_age_grace_seconds: float = 600.0  # ... and its calls then get this long to finish

    def validate(self) -> None:
        if not 1 <= self.max_concurrent_streams <= 10_000:
            raise ValueError(f"max_concurrent_streams: must be in 1..10000, got {self.max_concurrent_streams}")
        if self.max_connections < 0:
            raise ValueError(f"max_connections: must be >= 0 (0: from the descriptor limit), got "
                             f"{self.max_connections}")
        for key in ("handshake_timeout_seconds", "keepalive_time_seconds", "keepalive_timeout_seconds",
                    "min_client_ping_interval_seconds", "max_connection_idle_seconds",
                    "max_connection_age_seconds", "max_connection_age_grace_seconds"):
            value = getattr(self, key)
            if not 0 < value <= 7 * 86400:
                raise ValueError(f"{key}: must be in (0, 604800], got {value}")


def raise_descriptor_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (the common 1024 is a shell default, not a need); returns
    the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(config: TransportConfig, descriptor_limit: int) -> int:
    """Accepted connections beyond this are closed at once, so descriptors are left for files and health."""
    headroom = max(16, descriptor_limit - RESERVED_DESCRIPTORS)
    return min(config.max_connections, headroom) if config.max_connections else headroom


def server_options(config: TransportConfig) -> list[tuple[str, int]]:
    """grpc.aio.server(options=...) entries for the limits."""
    def ms(seconds: float) -> int:
        return int(seconds * 1000)
    cap = connection_cap(config, raise_descriptor_limit())
    log.info("transport_limits", max_connections=cap, max_concurrent_streams=config.max_concurrent_streams)
    return [("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ("grpc.max_allowed_incoming_connections", cap),
            ("grpc.server_handshake_timeout_ms", ms(config.handshake_timeout_seconds)),
            ("grpc.keepalive_time_ms", ms(config.keepalive_time_seconds)),
            ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_seconds)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(config.min_client_ping_interval_seconds)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", ms(config.max_connection_idle_seconds)),
            ("grpc.max_connection_age_ms", ms(config.max_connection_age_seconds)),
            ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_seconds))]
