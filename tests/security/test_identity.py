"""Identity -> role mapping and the development CA's output, without a network."""
from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from service.security.auth import ROLE_METHODS, Authenticator, allowed
from service.security.config import SecurityConfig
from service.security.credentials import token_digest
from service.security.devca import main as certs_main


def test_certs_command_writes_a_ca_server_and_one_client_per_role(tmp_path, capsys):
    assert certs_main(["--out", str(tmp_path / "pki"), "--host", "incar.local", "--host", "10.0.0.2"]) == 0
    out = tmp_path / "pki"
    assert "mode: mtls" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["incar.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    for role in ROLE_METHODS:
        cert = x509.load_pem_x509_certificate((out / f"{role}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uri.get_values_for_type(x509.UniformResourceIdentifier)[0].startswith(f"spiffe://incar/{role}/")
        assert stat.S_IMODE((out / f"{role}.key").stat().st_mode) == 0o600
    token = (out / "hmi.token").read_text().strip()
    cfg = SecurityConfig(tokens_file=str(out / "tokens.yaml"))
    assert cfg.load_tokens() == {token_digest(token): ("hmi-token-dashboard", "hmi")}


def test_role_from_san_uri_then_cn_then_ou():
    auth = Authenticator(SecurityConfig(identity_roles={"spiffe://incar/camera/*": "camera",
                                                        "gateway-01": "vehicle"}))
    assert auth.role_for_certificate(("spiffe://incar/camera/rear",), "x", ()).role == "camera"
    assert auth.role_for_certificate((), "gateway-01", ()).role == "vehicle"
    assert auth.role_for_certificate((), "someone", ("hmi",)).role == "hmi"          # OU=hmi
    assert auth.role_for_certificate((), "someone", ("marketing",)) is None
    strict = Authenticator(SecurityConfig(role_from_ou=False, identity_roles={}))
    assert strict.role_for_certificate((), "someone", ("admin",)) is None


@pytest.mark.parametrize("role,method,ok", [
    ("hmi", "/incar.v1.Assistant/Ask", True),
    ("hmi", "/incar.v1.Greeter/ListProfiles", True),
    ("hmi", "/incar.v1.Greeter/Enroll", False),
    ("hmi", "/incar.v1.Greeter/DeleteProfile", False),
    ("hmi", "/incar.v1.Vehicle/UpdateState", False),
    ("hmi", "/incar.v1.Cameras/StreamFrames", False),
    ("camera", "/incar.v1.Cameras/StreamFrames", True),
    ("camera", "/incar.v1.Cameras/ListCameras", False),
    ("camera", "/grpc.health.v1.Health/Check", True),
    ("vehicle", "/incar.v1.Vehicle/UpdateState", True),
    ("vehicle", "/incar.v1.Events/Subscribe", False),
    ("admin", "/incar.v1.Greeter/Enroll", True),
    ("admin", "/incar.v1.Anything/New", True),
    ("nobody", "/incar.v1.System/GetStatus", False),
])
def test_role_method_table(role, method, ok):
    assert allowed(role, method) is ok
