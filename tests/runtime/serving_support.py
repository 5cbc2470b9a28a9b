"""Shared by the engine and Assistant tests: the real default bundle (built once, cached by the builder's
input hash) and one loaded model per test session."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = Path(os.environ.get("INCAR_TEST_BUNDLE", ROOT / "build" / "models" / "smollm2-135m-instruct"))


@functools.cache
def default_bundle():
    from service.runtime.bundle import load_bundle
    if not (BUNDLE / "manifest.json").exists():
        # The project's own build step (a no-op when the cached bundle's inputs are unchanged).
        subprocess.run([sys.executable, "-m", "service.cli", "model", "build", "--default",
                        "--out", str(BUNDLE.parent)], cwd=ROOT, check=True)
    return load_bundle(BUNDLE)


@functools.cache
def language_model():
    from service.runtime.generator import LanguageModel
    return LanguageModel(default_bundle(), "cpu", threads=2)
