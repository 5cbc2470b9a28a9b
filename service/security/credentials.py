"""gRPC credentials from the security config (server) and from certificate files (clients)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import structlog

from service.security.config import SecurityConfig

log = structlog.get_logger(__name__)


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port, or None in insecure-loopback mode.

    Certificates are re-read when their files change (checked at each new connection), so a renewed
    certificate or CA takes effect without a restart; a half-written or mismatched set is ignored (the previous
    one stays in force) until the files are consistent again.
    """
    if cfg.mode == "insecure-loopback":
        return None
    files = [Path(cfg.cert_file), Path(cfg.key_file)] + ([Path(cfg.ca_file)] if cfg.ca_file else [])
    # mtls: the handshake itself refuses a client without a certificate from our CA.
    # tls: no client certificate is requested; clients identify with bearer tokens.
    reloader = _CertificateReloader(files, cfg.ca_file != "")
    return grpc.dynamic_ssl_server_credentials(reloader.load(), reloader.fetch,
                                               require_client_authentication=cfg.mode == "mtls")


class _CertificateReloader:
    def __init__(self, files: list[Path], with_ca: bool):
        self.files = files
        self.with_ca = with_ca
        self.stamp = self._stamp()

    def _stamp(self):
        try:
            return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (f.stat() for f in self.files))
        except OSError:
            return None

    def load(self) -> grpc.ServerCertificateConfiguration:
        chain = _read(self.files[0], "cert_file")
        key = _read(self.files[1], "key_file")
        roots = _read(self.files[2], "ca_file") if self.with_ca else None
        _check_pair(chain, key)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stamp()
        if stamp is None or stamp == self.stamp:
            return None
        try:
            configuration = self.load()
        except ValueError as exc:
            log.warning("security.certificate_reload_skipped", reason=str(exc))
            return None        # mid-rotation: keep serving with the previous set, retry on the next connection
        self.stamp = stamp
        log.info("security.certificates_reloaded", cert_file=str(self.files[0]))
        return configuration


def _check_pair(chain: bytes, key: bytes) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    try:
        cert = x509.load_pem_x509_certificate(chain)
        private = serialization.load_pem_private_key(key, password=None)
    except ValueError as exc:
        raise ValueError(f"cert_file/key_file: not a PEM certificate and unencrypted PEM key: {exc}") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != private.public_key().public_bytes(*fmt):
        raise ValueError("key_file: does not belong to the certificate in cert_file")


def channel_credentials(ca_file: str | Path, cert_file: str | Path | None = None, key_file: str | Path | None = None,
                        token: str | None = None) -> grpc.ChannelCredentials:
    """Client side: trust `ca_file`, present a certificate when given, send a bearer token when given."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "ca_file"),
        private_key=_read(key_file, "key_file") if key_file else None,
        certificate_chain=_read(cert_file, "cert_file") if cert_file else None)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def token_digest(token: str) -> str:
    """The key a token is configured under (security.tokens): its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()
