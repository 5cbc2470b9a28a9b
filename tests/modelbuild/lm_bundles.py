"""LM bundles for tests: the default SmolLM2 bundle (built once, cached by inputs hash) and a tiny LFM2 bundle."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def default_bundle_path() -> Path:
    """Build (or reuse) the default bundle exactly as `make models` does; return its folder."""
    from service.modelbuild.cli import DEFAULT_BUNDLE_NAME, main

    models = Path(os.environ.get("INCAR_MODELS_DIR", ROOT / "build" / "models"))
    if main(["build", "--default", "--out", str(models)]) != 0:
        raise RuntimeError("incar model build --default failed")
    return models / DEFAULT_BUNDLE_NAME


def tiny_lfm2_bundle_path(root: Path, variants: str = "float,float_replace,int8") -> tuple[Path, Path]:
    """A seeded tiny LFM2 checkpoint (HF layout) and a bundle built from it by the CLI: (checkpoint, bundle)."""
    from service.modelbuild.cli import main
    from service.modelbuild.tiny import write_tiny_lfm2

    ckpt = write_tiny_lfm2(root / "tiny-lfm2")
    if main(["build", "--lfm2", str(ckpt), "--out", str(root / "bundles"), "--name", "tiny-lfm2",
             "--variants", variants, "--context", "64", "--chunk", "8"]) != 0:
        raise RuntimeError("incar model build --lfm2 failed")
    return ckpt, root / "bundles" / "tiny-lfm2"
