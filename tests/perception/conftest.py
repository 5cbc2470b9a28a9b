from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.perception.build import build


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Converted models, built once per session when missing or stale (a no-op when `incar perception build` ran)."""
    out = Path(os.environ.get("INCAR_MODELS_DIR", "build/models"))
    build(out, progress=lambda line: None)
    return out
