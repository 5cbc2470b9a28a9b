"""gRPC credentials from the security config (server) and from certificate files (clients)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from service.security.config import SecurityConfig


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port, or None in insecure-loopback mode."""
    if cfg.mode == "insecure-loopback":
        return None
    chain = _read(cfg.cert_file, "cert_file")
    key = _read(cfg.key_file, "key_file")
    roots = _read(cfg.ca_file, "ca_file") if cfg.ca_file else None
    # mtls: the handshake itself refuses a client without a certificate from our CA.
    # tls: a client certificate is optional but, when presented, still verified against ca_file.
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=roots,
                                       require_client_auth=cfg.mode == "mtls")


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
