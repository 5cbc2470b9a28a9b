"""No silent per-tensor weights: every Conv/MatMul/Gemm weight of every QDQ graph the project ships is read back
from the file and must carry one scale per output channel (or per block), never one for the whole tensor.

The trap this guards against: `get_qnn_qdq_config(per_channel=True)` makes Conv per-channel but leaves MatMul
weights per-tensor without a word (shared/quant-notes.md: 18 dB instead of 27 dB on SmolLM2)."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from service.modelbuild import qdq, vision, weight_codec

MODELS = Path(os.environ.get("INCAR_MODELS_DIR", "build/models"))


def _check(path: Path) -> list[weight_codec.WeightEncoding]:
    encodings = weight_codec.weight_encodings(onnx.load(str(path)))
    assert encodings, f"{path.name}: no quantized weights found"
    bad = [e for e in encodings if not e.per_channel or e.dtype == "float"]
    assert not bad, f"{path.name}: per-tensor or float weights: {bad[:3]}"
    return encodings


@pytest.fixture(scope="module")
def perception_models() -> Path:
    from service.perception.build import build
    build(MODELS, progress=lambda line: None)         # no-op when up to date (the test set-up built them)
    return MODELS / "perception"


def test_every_perception_qdq_weight_is_per_channel(perception_models):
    graphs = sorted(perception_models.glob("*.qdq.onnx"))
    assert graphs, f"no QDQ perception graphs under {perception_models}"
    counts = {}
    for path in graphs:
        encodings = _check(path)
        counts[path.name] = len(encodings)
        assert all(e.dtype == "int8" for e in encodings), path.name
    print(counts)


def test_vision_component_weights_are_per_channel(tmp_path):
    cfg = vision.tiny_config(lm_hidden=32)
    component = vision.build_vision_component(cfg, vision.random_weights(cfg), tmp_path,
                                              precisions=("float", "w8a16", "w4a16"), calibration_samples=4,
                                              held_out_samples=1)
    for precision in ("w8a16", "w4a16"):
        encodings = _check(tmp_path / component["variants"][precision]["file"])
        matmuls = [e for e in encodings if e.op == "MatMul"]
        assert matmuls and all(e.axis == (0 if e.block_size else 1) for e in matmuls)
        if precision == "w4a16":      # the connector's K=32/64 rows: LPBQ where K is a multiple of 64
            assert any(e.dtype == "int4" and e.block_size == qdq.LPBQ_BLOCK for e in matmuls)


def test_weight_encodings_flags_per_tensor_and_float_weights(tmp_path):
    """The checker itself: a graph quantized the old way (QNN config's per_channel=True) is caught."""
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from service.modelbuild.graph import GraphBuilder
    g = GraphBuilder("trap")
    x = g.input("x", "float32", [1, 4, 64])
    y = g.op("MatMul", [x, g.init("fc.weight", np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))])
    g.output(y, "y", "float32", [1, 4, 32])
    float_path = g.save(tmp_path / "trap.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 64)).astype(np.float32)} for i in range(2)]
    config = get_qnn_qdq_config(str(float_path), qdq.calibration_reader(feeds), activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QInt8, per_channel=True)
    quantize(str(float_path), str(tmp_path / "trap.qdq.onnx"), config)
    (enc,) = weight_codec.weight_encodings(onnx.load(str(tmp_path / "trap.qdq.onnx")))
    assert not enc.per_channel and enc.channels == 32
    (enc,) = weight_codec.weight_encodings(onnx.load(str(float_path)))
    assert enc.dtype == "float"
    fixed = qdq.quantize_qdq(float_path, tmp_path / "fixed.onnx", feeds, "w8a16")
    (enc,) = weight_codec.weight_encodings(onnx.load(str(fixed)))
    assert enc.per_channel and enc.scale_shape == (32,)
