"""Signed model bundles: an Ed25519 signature over the exact bytes of manifest.json, which holds every file's
sha256, so the signature covers the whole bundle (the loader checks each file against the manifest).

    incar model keygen --out keys/            # keys/bundle-signing.key (keep it off the car), keys/bundle-signing.pub
    incar model sign build/models/smollm2-135m-instruct --key keys/bundle-signing.key

The service verifies before it loads: a bundle whose signature does not verify with a trusted key is refused with
the reason on health; an unsigned one is refused too unless `security.allow_unsigned_bundles` (the embedded
default, for bundles built locally by `make models`, which nobody has signed).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"


class SignatureError(RuntimeError):
    """The bundle may not be loaded: unsigned (and that is not allowed), tampered, or signed by an unknown key."""


@dataclass(frozen=True)
class Verdict:
    signed: bool
    key_id: str          # "" when unsigned
    note: str            # what health says about it ("signed by ...", "unsigned: allowed by ...")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def generate_keypair(out: str | Path, name: str = "bundle-signing") -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    pub_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def sign_bundle(bundle: str | Path, private_key: Ed25519PrivateKey) -> Path:
    """Write manifest.sig beside manifest.json; returns its path."""
    bundle = Path(bundle)
    manifest = (bundle / "manifest.json").read_bytes()
    body = {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "signature": base64.b64encode(private_key.sign(manifest)).decode()}
    path = bundle / SIGNATURE_FILE
    tmp = path.with_suffix(".sig.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class BundleVerifier:
    """Checks a bundle's manifest bytes against the trusted keys before the runtime parses them."""

    def __init__(self, trusted_keys: list[str] | tuple[str, ...] = (), allow_unsigned: bool = False):
        self.keys = {key_id(k): k for k in (load_public_key(p) for p in trusted_keys)}
        self.allow_unsigned = allow_unsigned

    def verify(self, bundle: str | Path, manifest: bytes) -> Verdict:
        bundle = Path(bundle)
        sig_path = bundle / SIGNATURE_FILE
        if not sig_path.is_file():
            if self.allow_unsigned:
                return Verdict(False, "", "unsigned bundle, allowed by security.allow_unsigned_bundles")
            raise SignatureError(f"{bundle}: unsigned bundle (no {SIGNATURE_FILE}); sign it with `incar model "
                                 "sign` or set security.allow_unsigned_bundles=true")
        try:
            body = json.loads(sig_path.read_text())
            signature = base64.b64decode(body["signature"], validate=True)
            claimed = str(body.get("key_id", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"{sig_path}: unreadable signature file: {exc}") from None
        if body.get("algorithm") != ALGORITHM:
            raise SignatureError(f"{sig_path}: algorithm {body.get('algorithm')!r} is not {ALGORITHM}")
        if not self.keys:
            raise SignatureError(f"{bundle}: signed by key {claimed}, but no key is trusted "
                                 "(security.bundle_trusted_keys)")
        # Try the claimed key first, then every trusted key: the key id is a hint, not a proof.
        candidates = sorted(self.keys.items(), key=lambda item: item[0] != claimed)
        for kid, key in candidates:
            try:
                key.verify(signature, manifest)
                return Verdict(True, kid, f"signed by trusted key {kid}")
            except InvalidSignature:
                continue
        if claimed in self.keys:
            raise SignatureError(f"{bundle}: manifest.json does not match its signature by key {claimed} "
                                 "(tampered or re-built after signing)")
        raise SignatureError(f"{bundle}: signature by key {claimed or '?'} does not verify with any trusted key "
                             f"({', '.join(sorted(self.keys))})")


def verifier_from(security_config) -> BundleVerifier:
    return BundleVerifier(tuple(getattr(security_config, "bundle_trusted_keys", ()) or ()),
                          bool(getattr(security_config, "allow_unsigned_bundles", False)))


def sign_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar model sign", description="Sign a bundle's manifest (Ed25519)")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--key", required=True, type=Path, help="Ed25519 private key (PEM), from `incar model keygen`")
    args = parser.parse_args(argv)
    try:
        key = load_private_key(args.key)
        if not (args.bundle / "manifest.json").is_file():
            raise ValueError(f"{args.bundle}: not a bundle (no manifest.json)")
        path = sign_bundle(args.bundle, key)
    except ValueError as exc:
        print(f"incar model sign: {exc}", file=sys.stderr)
        return 2
    print(f"signed {args.bundle} with key {key_id(key.public_key())}: {path}")
    return 0


def keygen_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="incar model keygen", description="Make an Ed25519 bundle-signing key pair")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--name", default="bundle-signing")
    args = parser.parse_args(argv)
    key_path, pub_path = generate_keypair(args.out, args.name)
    print(f"private key {key_path} (keep it off the car), public key {pub_path} "
          f"(id {key_id(load_public_key(pub_path))}: list it in security.bundle_trusted_keys)")
    return 0
