"""LM fixtures (helpers in lm_bundles.py, shared with tests/runtime)."""
from __future__ import annotations

from pathlib import Path

import pytest
from tests.modelbuild.lm_bundles import default_bundle_path, tiny_lfm2_bundle_path


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    return default_bundle_path()


@pytest.fixture(scope="session")
def tiny_lfm2(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_lfm2_bundle_path(tmp_path_factory.mktemp("lm"))
