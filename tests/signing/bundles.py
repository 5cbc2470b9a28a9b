"""Bundle copies for signing and swap tests: the real default bundle's model files hard-linked (no 650 MB copy),
its manifest a real copy that a test may rename, sign or tamper with without touching build/models."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.conftest import ROOT

DEFAULT_BUNDLE = ROOT / "build" / "models" / "smollm2-135m-instruct"


def bundle_copy(dest: Path, name: str | None = None) -> Path:
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        raise FileNotFoundError(f"{DEFAULT_BUNDLE}: the default bundle is built by `make models`")
    dest.mkdir(parents=True)
    for item in DEFAULT_BUNDLE.iterdir():
        if item.name in ("manifest.json", "manifest.sig"):
            continue
        try:
            os.link(item, dest / item.name)
        except OSError:      # another file system: a copy, slower but the same bytes
            shutil.copy2(item, dest / item.name)
    manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
    if name:
        manifest["name"] = name
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def tamper(bundle: Path) -> None:
    """Change the manifest after signing, as an attacker swapping a file and its hash would have to."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = "0" * 64
    path = bundle / "manifest.json"
    path.unlink()            # never write through a hard link into build/models
    path.write_text(json.dumps(manifest, indent=2))
