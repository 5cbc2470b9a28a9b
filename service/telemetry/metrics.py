"""The metrics endpoint (its own port) and the gRPC server metrics. Every incar metric starts with `incar_`."""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

PREFIX = "incar_"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

GRPC_STARTED = Counter("incar_grpc_server_started_total", "RPCs started", ["grpc_service", "grpc_method"])
GRPC_HANDLED = Counter("incar_grpc_server_handled_total", "RPCs completed, by status code",
                       ["grpc_service", "grpc_method", "grpc_code"])
GRPC_SECONDS = Histogram("incar_grpc_server_handling_seconds", "RPC handling time until the status is sent",
                         ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS)
GRPC_ACTIVE = Gauge("incar_grpc_server_active_rpcs", "RPCs in progress (streams included)", ["grpc_service"])
SERVICE_UP = Gauge("incar_service_serving", "1 when a service's health is SERVING", ["service"])
BUILD_INFO = Gauge("incar_build_info", "Build and model information", ["version", "model", "backend"])


def start_metrics_server(listen: str) -> int:
    """Serve /metrics on host:port (port 0 picks a free one); returns the port."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=REGISTRY)
    return server.server_address[1]
