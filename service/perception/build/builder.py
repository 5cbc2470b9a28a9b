"""Convert (and quantize) the catalog's models once; each output is keyed by a content hash of its inputs
(source weights, converter code, static shape, calibration photos, tool versions) and skipped when up to date."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx
import onnxruntime
import structlog

from service.perception.build.catalog import SPECS
from service.perception.build.convert import convert_float
from service.perception.build.cpu_int8 import RECIPE as CPU_INT8_RECIPE
from service.perception.build.cpu_int8 import quantize_cpu_int8
from service.perception.build.quantize import quantize_w8a16, recipe_name
from service.perception.build.spec import ModelSpec
from service.perception.models import CPU_INT8, INT8_MODELS, MANIFEST, VARIANTS, model_path, models_dir
from service.runtime.bundle import sha256_file

log = structlog.get_logger(__name__)

BUILD_VERSION = "1"   # bump when the conversion code changes in a way the hash cannot see
_TFJS_DIR = Path(__file__).parent / "tfjs"


def _source_digest(spec: ModelSpec) -> str:
    src = spec.source_path()
    if spec.kind != "tfjs":
        return sha256_file(src)
    # The converter is part of the input: its code changes the output.
    weights = [src.parent / p for group in json.loads(src.read_text())["weightsManifest"] for p in group["paths"]]
    files = [src, *weights, *sorted(_TFJS_DIR.glob("*.py"))]
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _keys(spec: ModelSpec) -> dict[str, str]:
    from service.perception.calibration import CALIBRATION_PHOTOS, photos_digest
    base = _digest({"build": BUILD_VERSION, "source": _source_digest(spec), "shape": spec.input_shape,
                    "onnx": onnx.__version__})
    # A quantized variant depends on the float graph, the quantizer, the calibration photos and its recipe.
    calibrated = {"float": base, "ort": onnxruntime.__version__, "photos": photos_digest(CALIBRATION_PHOTOS)}
    return {"float": base, "qdq": _digest({**calibrated, "recipe": recipe_name(spec)}),
            CPU_INT8: _digest({**calibrated, "recipe": CPU_INT8_RECIPE})}


def build(out_dir: str | Path | None = None, names: Iterable[str] | None = None, *, quantize: bool = True,
          cpu_int8: bool | None = None, progress: Callable[[str], None] = print) -> dict[str, dict[str, str]]:
    """Convert (and quantize) the named models (default: the whole catalog), skipping what is up to date.
    `cpu_int8`: also the CPU int8 variant of the models that have one (default: with `quantize`)."""
    cpu_int8 = quantize if cpu_int8 is None else cpu_int8
    out = Path(out_dir) if out_dir is not None else models_dir()
    (out / "perception").mkdir(parents=True, exist_ok=True)
    manifest_path = out / "perception" / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in names or SPECS:
        if name not in SPECS:
            raise KeyError(f"perception: unknown model {name!r}; known: {', '.join(SPECS)}")
        spec = SPECS[name]
        keys = _keys(spec)
        entry = manifest.get(name, {})
        variants = (*(VARIANTS if quantize else ("float",)),
                    *((CPU_INT8,) if cpu_int8 and name in INT8_MODELS else ()))
        for variant in variants:
            dst = model_path(name, variant, out)
            if entry.get(variant) == keys[variant] and dst.exists():
                progress(f"perception: {name} {variant}: up to date")
                continue
            t0 = time.monotonic()
            if variant == "float":
                convert_float(spec, dst)
            elif variant == CPU_INT8:
                quantize_cpu_int8(model_path(name, "float", out), dst, spec)
            else:
                quantize_w8a16(model_path(name, "float", out), dst, spec)
            entry[variant] = keys[variant]
            manifest[name] = entry
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            seconds = time.monotonic() - t0
            progress(f"perception: {name} {variant}: built {dst} ({dst.stat().st_size / 1e6:.1f} MB) in {seconds:.1f}s")
            log.info("perception_model_built", model=name, variant=variant, seconds=round(seconds, 2))
    return manifest


def ensure_built(out_dir: str | Path | None = None) -> Path:
    """Build what is missing (tests call this; the build is a no-op when up to date)."""
    out = Path(out_dir) if out_dir is not None else models_dir()
    build(out, progress=lambda line: None)
    return out
