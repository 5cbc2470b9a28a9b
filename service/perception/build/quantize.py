"""The W8A16 QDQ variant of a perception model, for the HTP: the CNN recipe of service/modelbuild/cnn_ptq.py
(per-channel int8 weights on every Conv/MatMul, equalization, sequential rounding, bias correction, split
layers) with 16-bit activation ranges from augmented real photos (docs/quantization.md)."""
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
# the CNN recipe too, on its calibration crops as they are (UNAUGMENTED).
RECIPE = "W8A16-cnn_ptq-v6"
# The text detectors keep the plain per-channel recipe (service.modelbuild.qdq: int8 per-channel on every weight,
# MinMax ranges from the rendered signs as they are). The CNN recipe on their unaugmented calibration doubles
# their CPU map SQNR (docs/quantization-htp.md), but the HTP emulator computes that graph 4.6 dB from CPU QDQ (cause
# not found: not the splits, equalization or bias correction); with augmented ranges it cut "P2 LEVEL C-14" short.
# v3: its weight scales made exact for the HTP's requantization too (htp_requant.align_file) and ConvTranspose +
# Add(bias) folded: PP-OCR's detector on the held-out signs then agrees with CPU QDQ on the emulator to 36 dB
# (was 21), the strip detector to 55 dB (was 44), with the same boxes and text. v4: the int32 bias fit (v6 above).
TEXT_RECIPE = "W8A16-perchannel-minmax-v4"
# The recognizer takes the CNN recipe on its crops as they are: 37-40 dB where the plain recipe gave 14.5-30.
UNAUGMENTED = ("ocr_rec",)
AUGMENT_COPIES = 8          # each calibration photo + 7 flipped/jittered/shifted variants


def cnn_recipe():
    from service.modelbuild.cnn_ptq import CnnRecipe
    return CnnRecipe(stat_samples=16, sensitivity_samples=2, min_rounding_samples=16)


def recipe_name(spec: ModelSpec) -> str:
    """The cache key's recipe: for the CNN models with every CnnRecipe field, so that a changed default in
    cnn_ptq (e.g. split_spatial) rebuilds them everywhere instead of leaving old graphs under the same key."""
    if spec.name in UNAUGMENTED:
        return f"{RECIPE} unaugmented {cnn_recipe()!r}"
    return TEXT_RECIPE if spec.name.startswith("ocr") else f"{RECIPE} {cnn_recipe()!r}"


def quantize_w8a16(float_path: Path, dst: Path, spec: ModelSpec) -> None:
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    from service.modelbuild.cnn_ptq import augment, quantize_cnn
    from service.modelbuild.htp_requant import align_file
    from service.modelbuild.htp_rewrites import fold_bias_adds
    from service.modelbuild.qdq import quantize_qdq
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
            if recipe_name(spec) == TEXT_RECIPE:
                quantize_qdq(pre, tmp_dst, [{input_name: t} for t in spec.calibration()], "w8a16")
                align_file(tmp_dst)     # as quantize_cnn does: CPU QDQ then computes what the HTP computes
            else:
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
