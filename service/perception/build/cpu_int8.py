"""The CPU int8 variant of a perception model, for the x86 fast path (`PerceptionConfig(variant="cpu-int8")`):
static int8 quantization with onnxruntime's quantizer, QDQ U8S8 (uint8 activations, int8 per-channel weights),
MinMax ranges from the calibration photos and augmented copies of them. ORT fuses the QDQ pairs into int8
convolutions, which AVX512-VNNI / AVX-VNNI run about twice as fast as the float ones (NanoDet at 416: 24.9 ->
10.7 ms per run on one thread here).

Only models whose int8 detections were checked against the float model's have this variant (INT8_MODELS in
service.perception.models; tests/perception/test_perception_cpu_int8.py holds them to it). The W8A16 QDQ
variants for the NPU are a different recipe (quantize.py) and are not touched by this one.

Measured on NanoDet, against the float model (bench/safety_int8.py): Percentile ranges and an Entropy
calibration lost more detections than MinMax; keeping the three head convolutions in float changed nothing
(the error is spread over the backbone's activations, no single layer dominates); 4 augmented copies per photo
lowered the score error a little (mean 0.035 -> 0.033). The int8 scores still came out ~0.035 lower on
average, which lost float detections just above the 0.3 threshold (the approach frames' small, distant
bicycle: 34 of 40 frames against 38); the head convolutions are therefore kept float and their biases take
back the mean shift of each channel (empirical bias correction): 39 of 40, float detections matched 91/99
against 84/99. Same speed (10.8 ms).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from service.perception.build.spec import ModelSpec

RECIPE = "cpu-int8-qdq-u8s8-perchannel-minmax-floatheads-biascorr-v1"
AUGMENT_COPIES = 4          # each calibration photo + 3 flipped/jittered/shifted variants


def head_convs(model: onnx.ModelProto) -> list[str]:
    """The convolutions nearest the graph outputs (NanoDet: one per stride, class logits and box bins in one
    tensor, split after it): what the outputs are computed from without another convolution in between."""
    producer = {o: n for n in model.graph.node for o in n.output}
    heads = set()
    for out in model.graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type != "Conv":
            node = producer.get(node.input[0]) if node.input else None
        if node is not None:
            heads.add(node.name)
    return sorted(heads)


def _head_outputs(model: onnx.ModelProto, heads: list[str], feeds: list[dict]) -> list[np.ndarray]:
    """Per head conv, its output over every feed as [channels, cells]."""
    from service.modelbuild.cnn_ptq import run_with
    output_of = {n.name: n.output[0] for n in model.graph.node if n.name in heads}
    names = [output_of[h] for h in heads]
    runs = list(run_with(model, feeds, names))
    return [np.concatenate([r[n][0].reshape(r[n].shape[1], -1) for r in runs], 1) for n in names]


def correct_head_bias(float_model: onnx.ModelProto, quantized: onnx.ModelProto, heads: list[str],
                      feeds: list[dict]) -> None:
    """Empirical bias correction (Nagel et al. 2019): the int8 backbone shifts each head channel's mean a
    little; the float heads' biases take back that shift, measured on the calibration feeds."""
    want, got = _head_outputs(float_model, heads, feeds), _head_outputs(quantized, heads, feeds)
    inits = {t.name: t for t in quantized.graph.initializer}
    for name, f, q in zip(heads, want, got):
        node = next(n for n in quantized.graph.node if n.name == name)
        if len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias + (f - q).mean(1).astype(np.float32),
                                                              node.input[2]))


def quantize_cpu_int8(float_path: Path, dst: Path, spec: ModelSpec) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from service.modelbuild.cnn_ptq import augment
    from service.modelbuild.qdq import calibration_reader

    with tempfile.TemporaryDirectory() as tmp:
        pre, staged = Path(tmp) / "pre.onnx", Path(tmp) / "out.onnx"
        # Shapes and constant folding first, as the quantizer expects (the TF.js graphs carry many Transposes).
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        float_model = onnx.load(str(pre))
        input_name = float_model.graph.input[0].name
        feeds = [{input_name: t} for t in augment(spec.calibration(), AUGMENT_COPIES)]
        heads = head_convs(float_model)

        logging.disable(logging.WARNING)   # the quantizer's per-node chatter; the agreement test is the check
        try:
            quantize_static(str(pre), str(staged), calibration_reader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=heads)
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(staged))
        correct_head_bias(float_model, model, heads, feeds)
        src_meta = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
        onnx.helper.set_model_props(model, {**src_meta, "incar_recipe": RECIPE})
        out = dst.with_suffix(".tmp")
        onnx.save(model, str(out))
        os.replace(out, dst)   # whole files only: a reader never sees a half-written model
