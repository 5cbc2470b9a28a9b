"""`incar certs --out DIR`: a development CA, a server certificate and one client certificate per role,
for the simulation and tests. Never for a production car: the CA key sits next to the certificates.

Client certificates carry the role twice: as a SPIFFE-style URI SAN (spiffe://incar/<role>/<name>) and as OU.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.security.config import ROLES
from service.security.credentials import token_digest

CLIENT_NAMES = {"hmi": "dashboard", "camera": "front", "vehicle": "gateway", "admin": "dev"}


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "incar development")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _write(path: Path, key, cert: x509.Certificate) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_dev_pki(out: str | Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                 days: int = 365, token: bool = True) -> dict[str, str]:
    """Write ca.pem/.key, server.pem/.key, <role>.pem/.key for every role, and (token=True) an HMI bearer
    token in hmi.token with its sha256 in tokens.yaml. Returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("incar development CA")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), days * 2)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    _write(out / "ca", ca_key, ca_cert)
    written = {"ca": str(out / "ca.pem")}

    def issue(stem: str, subject: x509.Name, sans: list[x509.GeneralName], usage) -> None:
        key = _key()
        cert = (_builder(subject, ca_name, key.public_key(), days)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(out / stem, key, cert)
        written[stem] = str(out / f"{stem}.pem")

    server_sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            server_sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            server_sans.append(x509.DNSName(host))
    issue("server", _name("incar server"), server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
    for role in ROLES:
        uri = f"spiffe://incar/{role}/{CLIENT_NAMES[role]}"
        issue(role, _name(f"incar-{role}-{CLIENT_NAMES[role]}", ou=role), [x509.UniformResourceIdentifier(uri)],
              ExtendedKeyUsageOID.CLIENT_AUTH)
    if token:
        value = secrets.token_urlsafe(32)
        (out / "hmi.token").write_text(value + "\n")
        (out / "hmi.token").chmod(0o600)
        (out / "tokens.yaml").write_text(
            "# sha256(token) -> [identity, role]; point security.tokens_file here\n"
            + json.dumps({token_digest(value): ["hmi-token-dashboard", "hmi"]}) + "\n")
        written["hmi.token"] = str(out / "hmi.token")
        written["tokens"] = str(out / "tokens.yaml")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="incar certs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the CA, server and client certificates")
    parser.add_argument("--host", action="append", default=[],
                        help="server name or IP for the server certificate (repeatable; default localhost, "
                             "127.0.0.1, ::1)")
    parser.add_argument("--days", type=int, default=365, help="validity of the leaf certificates")
    parser.add_argument("--no-token", action="store_true", help="do not make an HMI bearer token")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days: must be >= 1")
    written = make_dev_pki(args.out, hosts=tuple(args.host) or ("localhost", "127.0.0.1", "::1"),
                           days=args.days, token=not args.no_token)
    out = Path(args.out)
    print(f"wrote {len(written)} items to {out}")
    print("server config:\n  security:\n    mode: mtls\n"
          f"    cert_file: {out / 'server.pem'}\n    key_file: {out / 'server.key'}\n    ca_file: {out / 'ca.pem'}"
          + (f"\n    tokens_file: {out / 'tokens.yaml'}" if not args.no_token else ""))
    return 0
