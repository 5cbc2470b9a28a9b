"""The W8A16 QDQ variant of a perception model, for the HTP: 16-bit activations, 8-bit per-channel symmetric
weights, MinMax ranges from real photos."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from service.modelbuild.qdq import _reader as calibration_reader   # one calibration reader for every QDQ build
from service.perception.build.spec import ModelSpec

RECIPE = "W8A16-perchannel-minmax"


def quantize_w8a16(float_path: Path, dst: Path, spec: ModelSpec) -> None:
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
        samples = [{input_name: t} for t in spec.calibration()]
        config = get_qnn_qdq_config(str(pre), calibration_reader(samples), activation_type=QuantType.QUInt16,
                                    weight_type=QuantType.QInt8, per_channel=True)
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
        staged = dst.with_suffix(".tmp")
        onnx.save(model, str(staged))
        os.replace(staged, dst)   # whole files only: a reader never sees a half-written model
