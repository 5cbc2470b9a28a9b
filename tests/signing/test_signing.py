"""Ed25519 bundle signatures: sign, verify, refuse the unsigned and the tampered; the CLI; the service's health."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from service.config import load_config
from service.security.signing import BundleVerifier, SignatureError, generate_keypair, load_private_key, sign_bundle
from service.server import Application
from tests.conftest import ROOT, base_overrides
from tests.signing.bundles import bundle_copy, tamper


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(tmp_path / "keys")


def test_a_signed_bundle_verifies_and_a_changed_manifest_does_not(tmp_path, keys):
    key, pub = keys
    bundle = bundle_copy(tmp_path / "b")
    sign_bundle(bundle, load_private_key(key))
    verifier = BundleVerifier([str(pub)])
    verdict = verifier.verify(bundle, (bundle / "manifest.json").read_bytes())
    assert verdict.signed and verdict.key_id and verdict.key_id in verdict.note
    tamper(bundle)
    with pytest.raises(SignatureError, match="does not match its signature"):
        verifier.verify(bundle, (bundle / "manifest.json").read_bytes())


def test_unsigned_is_refused_unless_allowed_and_unknown_keys_are_refused(tmp_path, keys):
    bundle = bundle_copy(tmp_path / "b")
    raw = (bundle / "manifest.json").read_bytes()
    with pytest.raises(SignatureError, match="unsigned bundle"):
        BundleVerifier([str(keys[1])]).verify(bundle, raw)
    assert not BundleVerifier([], allow_unsigned=True).verify(bundle, raw).signed
    other_key, other_pub = generate_keypair(tmp_path / "other")
    sign_bundle(bundle, load_private_key(other_key))
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        BundleVerifier([str(keys[1])]).verify(bundle, raw)
    # Allowing unsigned bundles does not let a bad signature through.
    with pytest.raises(SignatureError):
        BundleVerifier([str(keys[1])], allow_unsigned=True).verify(bundle, raw)


def test_incar_model_keygen_and_sign(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "service.cli", "model", *args], cwd=ROOT,
                                       capture_output=True, text=True, timeout=120)
    made = run("keygen", "--out", str(tmp_path / "k"))
    assert made.returncode == 0, made.stderr
    bundle = bundle_copy(tmp_path / "b")
    signed = run("sign", str(bundle), "--key", str(tmp_path / "k" / "bundle-signing.key"))
    assert signed.returncode == 0 and "signed" in signed.stdout, signed.stderr
    assert (bundle / "manifest.sig").is_file()
    refused = run("sign", str(tmp_path), "--key", str(tmp_path / "k" / "bundle-signing.key"))
    assert refused.returncode == 2 and "not a bundle" in refused.stderr
    refused = run("sign", str(bundle), "--key", str(tmp_path / "k" / "bundle-signing.pub"))
    assert refused.returncode == 2 and "private key" in refused.stderr


async def assistant_status(tmp_path, bundle, pub) -> tuple[bool, str]:
    app = Application(load_config(env={}, overrides=base_overrides(tmp_path) + [
        f"runtime.bundle={bundle}", "security.allow_unsigned_bundles=false", f"security.bundle_trusted_keys=[{pub}]"]))
    await app.start()
    try:
        await asyncio.wait_for(app.ready(), 300)
        return app.health.status["incar.v1.Assistant"]
    finally:
        await app.stop(0.2)


async def test_the_service_refuses_unsigned_and_tampered_bundles_with_the_reason_on_health(tmp_path, keys):
    key, pub = keys
    unsigned = bundle_copy(tmp_path / "unsigned")
    serving, reason = await assistant_status(tmp_path / "s1", unsigned, pub)
    assert not serving and "bundle refused" in reason and "unsigned" in reason
    tampered = bundle_copy(tmp_path / "tampered")
    sign_bundle(tampered, load_private_key(key))
    tamper(tampered)
    serving, reason = await assistant_status(tmp_path / "s2", tampered, pub)
    assert not serving and "does not match its signature" in reason
    signed = bundle_copy(tmp_path / "signed")
    sign_bundle(signed, load_private_key(key))
    serving, reason = await assistant_status(tmp_path / "s3", signed, pub)
    assert serving and reason == ""
