"""The `security` config section: transport mode, certificate paths, bearer tokens, identity -> role mapping."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MODES = ("mtls", "tls", "insecure-loopback")
ROLES = ("hmi", "camera", "vehicle", "admin")


def _default_identity_roles() -> dict[str, str]:
    # SPIFFE-style URI SANs as the development CA issues them: spiffe://incar/<role>/<name>.
    return {f"spiffe://incar/{role}/*": role for role in ROLES}


@dataclass
class SecurityConfig:
    # "mtls": every client presents a certificate from our CA (checked in the handshake); bearer tokens also
    # work on top. "tls": server certificate only; clients prove who they are with a bearer token (HMI apps).
    # "insecure-loopback": plaintext, refused unless server.listen is a loopback address (development, tests).
    mode: str = "insecure-loopback"
    cert_file: str = ""                    # server certificate chain (PEM)
    key_file: str = ""                     # server private key (PEM)
    ca_file: str = ""                      # CA that signs client certificates (PEM)
    # sha256(token) hex -> [identity, role]; tokens themselves are never stored in config.
    tokens: dict[str, list[str]] = field(default_factory=dict)
    tokens_file: str = ""                  # YAML/JSON file with the same mapping (merged over `tokens`)
    # Certificate identity -> role. Keys match a SAN URI or the subject CN exactly, or as a prefix with a trailing '*'.
    identity_roles: dict[str, str] = field(default_factory=_default_identity_roles)
    role_from_ou: bool = True              # a certificate from our CA with OU=<role> gets that role
    # Role of a plaintext loopback peer without a token (insecure-loopback mode only); "" makes tokens mandatory.
    loopback_role: str = "admin"
    metrics_listen_public: bool = False    # allow the metrics endpoint on a non-loopback address
    # Model bundles: Ed25519 public keys (PEM) whose signature (`incar model sign`) the service accepts.
    bundle_trusted_keys: list[str] = field(default_factory=list)
    # true in the embedded defaults ON PURPOSE: bundles that `make models` builds locally are unsigned. A car sets
    # false and lists its keys above; then an unsigned bundle is refused, and a tampered one always is.
    allow_unsigned_bundles: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode in ("mtls", "tls"):
            needed = ("cert_file", "key_file") + (("ca_file",) if self.mode == "mtls" else ())
            for key in needed:
                path = getattr(self, key)
                if not path:
                    raise ValueError(f"{key}: required in mode {self.mode}")
                if not Path(path).is_file():
                    raise ValueError(f"{key}: {path} is not a readable file")
            if self.ca_file and not Path(self.ca_file).is_file():
                raise ValueError(f"ca_file: {self.ca_file} is not a readable file")
        if self.loopback_role and self.loopback_role not in ROLES:
            raise ValueError(f"loopback_role: expected one of {', '.join(ROLES)} or '', got {self.loopback_role!r}")
        for pattern, role in self.identity_roles.items():
            if role not in ROLES:
                raise ValueError(f"identity_roles.{pattern}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        self.load_tokens()
        from service.security.signing import load_public_key
        for i, path in enumerate(self.bundle_trusted_keys):
            try:
                load_public_key(path)
            except ValueError as exc:
                raise ValueError(f"bundle_trusted_keys[{i}]: {exc}") from None

    def load_tokens(self) -> dict[str, tuple[str, str]]:
        """sha256 hex -> (identity, role), from `tokens` and `tokens_file`; ValueError naming the bad entry."""
        raw = dict(self.tokens)
        if self.tokens_file:
            try:
                loaded = yaml.safe_load(Path(self.tokens_file).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ValueError(f"tokens_file: cannot read {self.tokens_file}: {exc}") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"tokens_file: {self.tokens_file} must hold a mapping sha256 -> [identity, role]")
            raw.update(loaded)
        out = {}
        for digest, entry in raw.items():
            digest = str(digest).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"tokens.{digest[:12]}...: key must be the sha256 hex digest of the token")
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"tokens.{digest[:12]}...: expected [identity, role], got {entry!r}")
            identity, role = str(entry[0]), str(entry[1])
            if role not in ROLES:
                raise ValueError(f"tokens.{digest[:12]}...: unknown role {role!r} (roles: {', '.join(ROLES)})")
            out[digest] = (identity, role)
        return out


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False     # a name or a wildcard (0.0.0.0, [::]) is not loopback


def check_listen(cfg: SecurityConfig, listen: str, metrics_listen: str | None = None) -> None:
    """What validate() cannot see: the addresses. Plaintext gRPC and the metrics endpoint stay on loopback
    unless configured otherwise. Raises ValueError("mode: ...") / ValueError("metrics_listen: ...")."""
    host = listen.rpartition(":")[0]
    if cfg.mode == "insecure-loopback" and not is_loopback_host(host):
        raise ValueError(f"mode: insecure-loopback refuses server.listen={listen!r}: plaintext is allowed on "
                         "loopback only; set security.mode to mtls or tls with certificates")
    if metrics_listen is not None and not cfg.metrics_listen_public:
        mhost = metrics_listen.rpartition(":")[0]
        if not is_loopback_host(mhost):
            raise ValueError(f"metrics_listen: {metrics_listen!r} is not loopback; set "
                             "security.metrics_listen_public=true to expose metrics")
