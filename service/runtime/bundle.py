"""Load and validate a model bundle (docs/model-bundle.md)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import structlog

FORMAT = "incar-bundle"
FORMAT_VERSION = 1
log = structlog.get_logger(__name__)


class BundleError(RuntimeError):
    """The bundle cannot be used; the message names the mismatch."""


def hash_file(path: str | Path, h=None):
    """Feed a file into `h` (a new sha256 when None) in 1 MiB blocks; returns `h`."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def sha256_file(path: str | Path) -> str:
    return hash_file(path).hexdigest()


class Bundle:
    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    def file(self, relpath: str) -> Path:
        p = (self.path / relpath).resolve()
        if self.path.resolve() not in p.parents:
            raise BundleError(f"{self.path}: file {relpath!r} lies outside the bundle")
        if not p.is_file():
            raise BundleError(f"{self.path}: file {relpath!r} is missing")
        return p

    def variant(self, component: str, name: str) -> dict:
        comps = self.manifest.get("components", {})
        if component not in comps:
            raise BundleError(f"{self.path}: no component {component!r} (has {', '.join(sorted(comps)) or 'none'})")
        variants = comps[component].get("variants", {})
        if name not in variants:
            raise BundleError(f"{self.path}: component {component!r} has no variant {name!r} "
                              f"(has {', '.join(sorted(variants)) or 'none'})")
        return variants[name]

    def variants(self, component: str) -> list[str]:
        return list(self.manifest.get("components", {}).get(component, {}).get("variants", {}))


def load_bundle(path: str | Path, verify_hashes: bool = True, check_manifest=None) -> Bundle:
    """Read manifest.json, check format and version, and check every listed file's sha256.
    `check_manifest(path, raw_bytes)` sees the very bytes parsed here (the signature check) and may raise."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle (no manifest.json)")
    try:
        raw = manifest_path.read_bytes()
        if check_manifest is not None:
            check_manifest(path, raw)
        manifest = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version!r} is not supported (this runtime reads {FORMAT_VERSION})")
    for key in ("components", "tokenizer", "text", "files"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest lacks {key!r}")
    bundle = Bundle(path, manifest)
    if verify_hashes:
        for rel, expected in manifest["files"].items():
            actual = sha256_file(bundle.file(rel))
            if actual != expected:
                raise BundleError(f"{path}: {rel} sha256 {actual[:12]}... does not match the manifest's "
                                  f"{expected[:12]}...")
    log.info("bundle_loaded", path=str(path), name=bundle.name, version=version)
    return bundle
