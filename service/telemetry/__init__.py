"""Telemetry: Prometheus metrics (one `incar_` prefix), structlog JSON logs, gRPC interceptors."""
