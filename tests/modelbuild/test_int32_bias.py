"""A near-dead channel keeps its bias: the int32 bias's scale is the input scale x the weight scale, so a channel
with tiny weights and a real bias (batch norm folded onto an almost unused filter, as in PP-OCR's detector)
needs a coarser weight scale than its own absmax gives, or its bias is clipped at int32 and the channel's
output is lost. onnxruntime's quantizer raises such scales; our own integers (`set_weight`) must too."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.modelbuild import cnn_ptq, qdq, weight_codec
from service.runtime.backends import create_session

DEAD = 3


def _graph(path, rng):
    w = (rng.standard_normal((16, 8, 1, 1)) * 0.3).astype(np.float32)
    w[DEAD] *= 1e-9                                      # an almost unused filter
    b = (rng.standard_normal(16) * 0.1).astype(np.float32)
    b[DEAD] = 2.0                                        # whose output is its bias
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")], "dead_channel",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path, w


def _feeds(rng, count):
    return [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(count)]


def _check(float_path, out, feeds):
    ref = create_session(float_path, "cpu")
    got = create_session(out, "cpu")
    a = np.concatenate([ref.run(None, f)[0] for f in feeds])
    b = np.concatenate([got.run(None, f)[0] for f in feeds])
    np.testing.assert_allclose(b[:, DEAD], 2.0, atol=1e-3)          # clipped, it would be ~0
    assert qdq.sqnr_db(a, b) > 40
    model = onnx.load(str(out))
    ints = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert ints and max(int(np.abs(i.astype(np.int64)).max()) for i in ints) <= weight_codec.BIAS_LIMIT


@pytest.mark.parametrize("rounding", ["given integers", "cnn recipe"])
def test_a_near_dead_channel_keeps_its_bias(tmp_path, rounding):
    rng = np.random.default_rng(0)
    float_path, w = _graph(tmp_path / "f.onnx", rng)
    feeds, out = _feeds(rng, 32), tmp_path / "q.onnx"
    if rounding == "given integers":        # our own per-channel scales, the channel's absmax / 127
        scale = weight_codec.channel_scale(w, 8, 0)
        qdq.quantize_qdq(float_path, out, feeds, "w8a16",
                         integers={"w": (weight_codec.round_to_grid(w, scale, 8, 0), scale)})
    else:
        cnn_ptq.quantize_cnn(float_path, out, feeds, recipe=cnn_ptq.CnnRecipe(htp_calibration_inputs=0))
    _check(float_path, out, feeds)
