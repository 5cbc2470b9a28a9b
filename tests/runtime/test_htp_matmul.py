"""The split of 16-bit x 16-bit MatMuls for the HTP (service/runtime/htp_matmul.py): on the QNN HTP emulator (CPU
fallback off) such a MatMul reads its second input at 8 bits (code // 257); the lowered graph computes what CPU
QDQ computes. B comes out of a Transpose with the recognizer's permutation, which is also how QNN once failed to
finalize the split graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.runtime import htp_lowering, htp_matmul
from service.runtime.backends import create_session
from service.runtime.providers import qnn_session_options

HEADS, T, D = 4, 48, 16
S_A, Z_A, S_B, Z_B = 6.4e-5, 39866, 2.5e-4, 30605        # the recognizer's Q K^T encodings, roughly
S_Y, Z_Y = 1.0e-3, 28156                                  # wide enough: no output saturates


def _attention_scores(path) -> onnx.ModelProto:
    """codes a [1, H, T, D], codes x [1, T, H, D] -> A @ Transpose(x) -> output codes [1, H, T, T]."""
    inits = [numpy_helper.from_array(np.array(v, t), n) for v, t, n in
             [(S_A, np.float32, "sa"), (Z_A, np.uint16, "za"), (S_B, np.float32, "sb"), (Z_B, np.uint16, "zb"),
              (S_Y, np.float32, "sy"), (Z_Y, np.uint16, "zy")]]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["a_f"]),
             helper.make_node("DequantizeLinear", ["x", "sb", "zb"], ["x_f"]),
             helper.make_node("Transpose", ["x_f"], ["b_t"], perm=[0, 2, 3, 1]),
             helper.make_node("QuantizeLinear", ["b_t", "sb", "zb"], ["b_q"]),
             helper.make_node("DequantizeLinear", ["b_q", "sb", "zb"], ["b_f"]),
             helper.make_node("MatMul", ["a_f", "b_f"], ["y_f"], name="scores"),
             helper.make_node("QuantizeLinear", ["y_f", "sy", "zy"], ["y"])]
    inputs = [helper.make_tensor_value_info("a", TensorProto.UINT16, [1, HEADS, T, D]),
              helper.make_tensor_value_info("x", TensorProto.UINT16, [1, T, HEADS, D])]
    graph = helper.make_graph(nodes, "scores", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.UINT16, [1, HEADS, T, T])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, str(path))
    return model


def _inputs():
    rng = np.random.default_rng(0)
    a = np.clip(rng.normal(Z_A, 9000, (1, HEADS, T, D)), 0, 65535).astype(np.uint16)
    x = np.clip(rng.normal(Z_B, 9000, (1, T, HEADS, D)), 0, 65535).astype(np.uint16)
    return {"a": a, "x": x}


def _rms(u, v) -> float:
    return float(np.sqrt(np.mean((np.asarray(u, np.float64) - v) ** 2)))


def _shrunk(feed: dict, name: str, zero_point: int, factor: int) -> dict:
    """`feed` with input `name`'s deviations from its zero point divided by `factor`."""
    codes = feed[name].astype(np.int64)
    return {**feed, name: (zero_point + (codes - zero_point) // factor).astype(np.uint16)}


def test_the_htp_reads_the_second_input_coarsely_and_the_split_restores_it(tmp_path):
    path = tmp_path / "scores.onnx"
    _attention_scores(path)
    feed = _inputs()
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = ort.InferenceSession(str(path), sess_options=qnn_session_options(
        "qnn-emulator", disable_cpu_fallback=True))                       # compiled as it is

    def error(f):
        return _rms(raw.run(None, f)[0], cpu.run(None, f)[0])
    # the trap's fingerprint: the error scales with A and not with B (B rounded to ~8 bits, A kept exact)
    full = error(feed)
    assert full > 20, full
    assert error(_shrunk(feed, "x", Z_B, 16)) > 0.6 * full, (error(_shrunk(feed, "x", Z_B, 16)), full)
    assert error(_shrunk(feed, "a", Z_A, 16)) < 0.2 * full, (error(_shrunk(feed, "a", Z_A, 16)), full)

    lowered = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False).run(None, feed)[0]
    reference = cpu.run(None, feed)[0]
    off = lowered.astype(np.float64) - reference
    # what is left is a constant offset of a few codes (the plain MatMul's requantization has it too) and ~3 codes
    assert _rms(lowered, reference) < 0.1 * full and abs(off.mean()) < 6 and off.std() < 4, (
        _rms(lowered, reference), off.mean(), off.std(), full)


def test_only_activation_matmuls_are_split_and_the_cpu_graph_keeps_its_result(tmp_path):
    model = _attention_scores(tmp_path / "scores.onnx")
    feed = _inputs()
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert 0 < before.min() and before.max() < 65535      # (a saturated sum could differ by the low part)
    assert htp_matmul.split_activation_matmuls(model) == 1
    assert htp_matmul.split_activation_matmuls(model) == 0          # its own products read B at 8 bits: left
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert _rms(after, before) < 1.0                                 # the same product, in two parts
    assert sorted(n.op_type for n in model.graph.node if n.op_type in ("MatMul", "Add", "Sub")) == [
        "Add", "MatMul", "MatMul", "Sub"]

    # a MatMul with a weight (an initializer) is not a 16 x 16 product: the lowering leaves such a file alone
    weight = numpy_helper.from_array(np.ones((D, 8), np.int8), "w")
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["a_f"]),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["w_f"]),
             helper.make_node("MatMul", ["a_f", "w_f"], ["y_f"]),
             helper.make_node("QuantizeLinear", ["y_f", "sy", "zy"], ["y"])]
    inits = [weight] + [numpy_helper.from_array(np.array(v, t), n) for v, t, n in
                        [(S_A, np.float32, "sa"), (Z_A, np.uint16, "za"), (0.01, np.float32, "sw"),
                         (S_Y, np.float32, "sy"), (Z_Y, np.uint16, "zy")]]
    graph = helper.make_graph(nodes, "w", [helper.make_tensor_value_info("a", TensorProto.UINT16, [1, T, D])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT16, [1, T, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
              str(tmp_path / "weights.onnx"))
    assert htp_lowering.lowered_bytes(tmp_path / "weights.onnx") is None
    assert htp_lowering.lowered_bytes(tmp_path / "scores.onnx") is not None
