"""The W8A16 QDQ variant of a perception model, for the HTP: the CNN recipe of service/modelbuild/cnn_ptq.py
(per-channel int8 weights on every Conv/MatMul, equalization, sequential rounding, bias correction, split
layers) with 16-bit activation ranges from augmented real photos; the text models' from their calibration signs and
crops as they are (docs/quantization.md)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from service.perception.build.spec import ModelSpec

# v2: statistics spread over all photos, only 1x1 convs split. v3: weight scales that the HTP requantizes exactly
# (htp_requant, inside quantize_cnn), Conv/ConvTranspose + Add(bias) folded (htp_rewrites), rounding against the
# quantized inputs (cnn_sequential). v4: the HTP's truncating requantization compensated, fitted per model on the
# emulator (htp_truncation, inside quantize_cnn) and recorded in the file for the QNN compile (htp_lowering).
# v5: a Concat's inputs share its output scale (htp_requant.share_concat_scales: QNN folds the Concat's
# requantization into the conv before it). v6: a near-dead channel's weight scale raised until its bias fits in
# int32 (weight_codec.set_weight; our scales had clipped such biases: age, pose), and PP-OCR's recognizer through
# the CNN recipe too, on its calibration crops as they are (UNAUGMENTED). v7: the HTP's floors on a channel's
# requantization multiplier (htp_requant: M >= 2^-24 and >= the output zero point x 2^-39), and with them PP-OCR's
# two text detectors through the CNN recipe as well (unaugmented): CPU map SQNR 5.5 -> 10.4 dB (full frame) and
# 33.7 -> 42.4 dB (strip); the emulator, which computed their CNN-recipe graphs 4.6 dB from CPU QDQ under the
# floors, now agrees with it to 38-54 dB (docs/quantization-htp.md). v8: HardSigmoid's output in the fixed encoding
# the HTP computes it in (qdq.FIXED_OUTPUT_ENCODINGS), and the truncation compensation fitted through the run-time
# lowering that now also splits 16-bit x 16-bit MatMuls (service/runtime/htp_matmul.py; the recognizer's
# attention), whose version is part of the key.
RECIPE = "W8A16-cnn_ptq-v8"
# The text models take the CNN recipe on their calibration signs and crops as they are: augmented ranges had cut
# "P2 LEVEL C-14" short.
UNAUGMENTED = ("ocr_rec", "ocr_det", "ocr_det_strip")
AUGMENT_COPIES = 8          # each calibration photo + 7 flipped/jittered/shifted variants


def cnn_recipe():
    from service.modelbuild.cnn_ptq import CnnRecipe
    return CnnRecipe(stat_samples=16, sensitivity_samples=2, min_rounding_samples=16)


def recipe_name(spec: ModelSpec) -> str:
    """The cache key's recipe: for the CNN models with every CnnRecipe field, so that a changed default in
    cnn_ptq (e.g. split_spatial) rebuilds them everywhere instead of leaving old graphs under the same key."""
    from service.runtime.htp_lowering import VERSION as lowering
    if spec.name in UNAUGMENTED:
        return f"{RECIPE} {lowering} unaugmented {cnn_recipe()!r}"
    return f"{RECIPE} {lowering} {cnn_recipe()!r}"


def quantize_w8a16(float_path: Path, dst: Path, spec: ModelSpec) -> None:
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    from service.modelbuild.cnn_ptq import augment, quantize_cnn
    from service.modelbuild.htp_rewrites import fold_bias_adds
    with tempfile.TemporaryDirectory() as tmp:
        # qnn_preprocess_model (ORT 1.31) crashes on graphs with metadata_props; strip them here, restore below.
        stripped = onnx.load(str(float_path))
        del stripped.metadata_props[:]
        bare, pre = Path(tmp) / "bare.onnx", Path(tmp) / "pre.onnx"
        onnx.save(stripped, str(bare))
        if not qnn_preprocess_model(str(bare), str(pre)):  # fuses Erf-GELU etc. into ops QNN has
            shutil.copyfile(bare, pre)
        prepared = onnx.load(str(pre))
        if fold_bias_adds(prepared):    # the HTP computes ConvTranspose + Add(bias) wrongly (OCR detector)
            onnx.save(prepared, str(pre))
        input_name = onnx.load(str(pre), load_external_data=False).graph.input[0].name
        tmp_dst = Path(tmp) / "out.onnx"
        # The quantizer warns (root logger) that it lifts opset 11 to 21 for 16-bit QDQ: expected, and checked
        # by the accuracy report, so keep the build log to our progress lines.
        logging.disable(logging.WARNING)
        try:
            copies = 1 if spec.name in UNAUGMENTED else AUGMENT_COPIES
            samples = [{input_name: t} for t in augment(spec.calibration(), copies)]
            quantize_cnn(pre, tmp_dst, samples, recipe=cnn_recipe())
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(tmp_dst))
        src_meta = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
        # keeps e.g. the OCR dictionary with the graph, beside what the recipe recorded (the HTP lowering's units)
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **src_meta})
        staged = dst.with_suffix(".tmp")
        onnx.save(model, str(staged))
        os.replace(staged, dst)   # whole files only: a reader never sees a half-written model
