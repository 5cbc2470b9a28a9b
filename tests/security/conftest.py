"""Security test helpers: one development PKI per session (made by our own devca), and an Application
running with the security config (until service/server.py calls service.security itself, a small shim
does what those integration lines do)."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.config import load_config
from service.security import integration
from service.security.auth import AuthInterceptor
from service.security.devca import make_dev_pki
from service.server import Application
from tests.conftest import base_overrides


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    make_dev_pki(out)
    return out


def security_overrides(pki: Path, mode: str) -> list[str]:
    return [f"security.mode={mode}", f"security.cert_file={pki / 'server.pem'}",
            f"security.key_file={pki / 'server.key'}", f"security.ca_file={pki / 'ca.pem'}",
            f"security.tokens_file={pki / 'tokens.yaml'}"]


def _integrated(app: Application) -> bool:
    return any(isinstance(i, AuthInterceptor) for i in app._interceptors())


class _SecuredApplication(Application):
    """The integration lines of service/security/integration.py applied through Application's own hooks."""

    def _interceptors(self):
        return super()._interceptors() + integration.interceptors(self.config)

    def _register(self, server):
        integration.check(self.config)
        plain_bind = server.add_insecure_port

        class _Binder:  # what add_port sees as the server: the real secure bind, the real plaintext bind
            add_insecure_port = staticmethod(plain_bind)
            add_secure_port = staticmethod(server.add_secure_port)
        server.add_insecure_port = lambda listen: integration.add_port(self.config, _Binder)
        return super()._register(server)


def make_app(tmp_path: Path, extra: list[str]) -> Application:
    config = load_config(env={}, overrides=base_overrides(tmp_path) + extra)
    app = Application(config)
    if _integrated(app):
        return app
    app.db.close()
    return _SecuredApplication(config)


@pytest.fixture
async def secure_app(tmp_path):
    started = []

    async def start(mode: str, pki: Path, extra: list[str] = ()) -> Application:
        app = make_app(tmp_path / f"app{len(started)}", security_overrides(pki, mode) + list(extra))
        await app.start()
        await app.ready()
        started.append(app)
        return app
    yield start
    for app in started:
        await app.stop(0.2)
