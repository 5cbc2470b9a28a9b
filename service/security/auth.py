"""Who is calling, and may they call this method: identity from the peer certificate or a bearer token,
mapped to a role, checked against the role's allowed methods.

grpc.aio interceptors only see HandlerCallDetails (no peer, no certificate), so the check runs inside a
wrapper around the real handler (`service.rpc_wrap.wrap_handler`), where `context.auth_context()` is available.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
from dataclasses import dataclass

import grpc
import structlog
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from service.rpc_wrap import wrap_handler
from service.security.config import SecurityConfig
from service.telemetry.metrics import PREFIX

from prometheus_client import Counter

log = structlog.get_logger(__name__)

AUTH_DENIED = Counter(f"{PREFIX}auth_denied_total", "RPCs refused by the auth check", ["role", "code"])

HEALTH = "/grpc.health.v1.Health/"
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")

# Allowed methods per role, as fnmatch patterns over the full method name "/package.Service/Method".
# Health and reflection are open to every authenticated peer (checked separately).
ROLE_METHODS: dict[str, tuple[str, ...]] = {
    "hmi": (
        "/incar.v1.Assistant/*",
        "/incar.v1.Events/*",
        "/incar.v1.System/*",
        "/incar.v1.Sentinel/*",
        "/incar.v1.CarFinder/*",
        "/incar.v1.Safety/*",
        "/incar.v1.Greeter/ListProfiles",     # enrol and delete are biometric data changes: admin only
        "/incar.v1.Vehicle/GetState",         # the HMI shows the car's state; only the gateway writes it
        "/incar.v1.Cameras/ListCameras",      # camera status for the HMI; frames come from cameras only
        "/incar.v1.Cameras/GetCameraStatus",
        "/incar.v1.LiveView/*",               # latest frames and what perception found: the HMI's camera tiles
    ),
    "camera": ("/incar.v1.Cameras/StreamFrames",),
    "vehicle": ("/incar.v1.Vehicle/UpdateState", "/incar.v1.Vehicle/GetState", "/incar.v1.VehicleActions/*"),
    "admin": ("*",),
}


@dataclass(frozen=True)
class Identity:
    name: str      # SAN URI, CN, or the token's configured identity
    role: str
    via: str       # "certificate", "token", "loopback"


def allowed(role: str, method: str) -> bool:
    if method.startswith(HEALTH) or method.startswith(REFLECTION):
        return True
    return any(fnmatch.fnmatchcase(method, pattern) for pattern in ROLE_METHODS.get(role, ()))


@functools.lru_cache(maxsize=256)
def _certificate_names(pem: bytes) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """(SAN URIs, subject CN, subject OUs) of a PEM certificate; cached because every RPC asks again."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME))
    return uris, str(cns[0].value) if cns else "", ous


def _is_loopback_peer(peer: str) -> bool:
    return peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))


class Authenticator:
    def __init__(self, cfg: SecurityConfig):
        self.cfg = cfg
        self.tokens = cfg.load_tokens()

    def role_for_certificate(self, uris: tuple[str, ...], cn: str, ous: tuple[str, ...]) -> Identity | None:
        for name in (*uris, cn):
            if not name:
                continue
            for pattern, role in self.cfg.identity_roles.items():
                if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
                    return Identity(name, role, "certificate")
        if self.cfg.role_from_ou:
            # Only our CA can have signed this certificate (the handshake verified it), so its OU is trusted.
            for ou in ous:
                if ou in ROLE_METHODS:
                    return Identity(uris[0] if uris else cn, ou, "certificate")
        return None

    def identify(self, context, metadata: dict[str, str]) -> tuple[Identity | None, str]:
        """(identity, why not) for this call."""
        auth = context.auth_context() or {}
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        if pem:
            uris, cn, ous = _certificate_names(bytes(pem))
            identity = self.role_for_certificate(uris, cn, ous)
            if identity is None:
                return None, f"certificate {(uris or (cn,))[0]!r} maps to no role"
            return identity, ""
        header = metadata.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None, "authorization metadata must be 'Bearer <token>'"
            secure = bool(auth.get("transport_security_type")) and auth["transport_security_type"][0] == b"ssl"
            if not secure and not _is_loopback_peer(context.peer()):
                return None, "bearer tokens are accepted over TLS only"
            entry = self.tokens.get(hashlib.sha256(token.strip().encode()).hexdigest())
            if entry is None:
                return None, "unknown bearer token"
            return Identity(entry[0], entry[1], "token"), ""
        if self.cfg.mode == "insecure-loopback" and self.cfg.loopback_role and _is_loopback_peer(context.peer()):
            return Identity("loopback", self.cfg.loopback_role, "loopback"), ""
        return None, "no client certificate and no bearer token"

    async def check(self, method: str, context, metadata: dict[str, str]) -> Identity | None:
        """Aborts the call (UNAUTHENTICATED / PERMISSION_DENIED, naming method and role) unless it may proceed."""
        identity, why = self.identify(context, metadata)
        if identity is None:
            # Orchestrators probe health from the same host without credentials.
            if method.startswith(HEALTH) and _is_loopback_peer(context.peer()):
                return None
            AUTH_DENIED.labels("none", "UNAUTHENTICATED").inc()
            log.warning("auth.unauthenticated", method=method, peer=context.peer(), reason=why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: unauthenticated: {why}")
        if not allowed(identity.role, method):
            AUTH_DENIED.labels(identity.role, "PERMISSION_DENIED").inc()
            log.warning("auth.permission_denied", method=method, identity=identity.name, role=identity.role)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{method}: role {identity.role!r} ({identity.name}) may not call this method")
        return identity


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, cfg: SecurityConfig):
        self.auth = Authenticator(cfg)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        check = self.auth.check
        if handler is None:
            # An unmounted method: refuse who may not call it the same way as if it existed, so an
            # unauthenticated peer cannot map the API; an allowed caller gets UNIMPLEMENTED.
            async def not_mounted(request_iterator, context):
                await check(method, context, metadata)
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: not served by this build")
                yield b""  # pragma: no cover - makes this an async generator (stream handler)
            return grpc.stream_stream_rpc_method_handler(not_mounted)

        # Requests arrive as bytes and are parsed only after the caller is known to be allowed: no untrusted
        # parsing for strangers, and corrupt wire bytes get INVALID_ARGUMENT (grpc's own path says UNKNOWN).
        async def around(call, context):
            await check(method, context, metadata)
            try:
                async for item in call():
                    yield item
            except NotImplementedError:
                # A generated base-class method the servicer never overrode (e.g. grpc.health.v1.Health/List in
                # grpcio-health-checking's aio servicer): that is UNIMPLEMENTED, not INTERNAL.
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: not implemented by this server")

        return wrap_handler(handler, around, method=method, parse_after_around=True)
