"""The few calls `Application.start()` makes: check the addresses, add the interceptor, bind the port."""
from __future__ import annotations

import grpc
import structlog

from service.security.auth import AuthInterceptor
from service.security.config import SecurityConfig, check_listen
from service.security.credentials import server_credentials

log = structlog.get_logger(__name__)


def security_of(app_config) -> SecurityConfig:
    return getattr(app_config, "security", None) or SecurityConfig()


def check(app_config) -> None:
    """Before anything binds: plaintext and metrics stay on loopback unless configured.
    Raises ConfigError("security.mode: ..." / "security.metrics_listen: ...") like any other bad setting."""
    from service.config import ConfigError
    try:
        check_listen(security_of(app_config), app_config.server.listen, app_config.server.metrics_listen)
    except ValueError as exc:
        raise ConfigError(f"security.{exc}") from None


def interceptors(app_config) -> list[grpc.aio.ServerInterceptor]:
    return [AuthInterceptor(security_of(app_config))]


def add_port(app_config, server: grpc.aio.Server) -> int:
    """Bind server.listen with the configured credentials; returns the port (0 when it could not bind)."""
    cfg = security_of(app_config)
    listen = app_config.server.listen
    from service.config import ConfigError
    try:
        check_listen(cfg, listen)
        creds = server_credentials(cfg)
    except ValueError as exc:   # unreadable files, a key that does not match its certificate
        raise ConfigError(f"security.{exc}") from None
    port = server.add_insecure_port(listen) if creds is None else server.add_secure_port(listen, creds)
    log.info("security.listen", mode=cfg.mode, listen=listen, port=port)
    return port
