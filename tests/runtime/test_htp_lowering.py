"""The HTP lowering (service/runtime/htp_lowering.py): which convs get their bias raised, by how much, and that
on the QNN HTP emulator (CPU fallback off) it takes away the truncating requantization's bias against CPU QDQ."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.runtime import htp_lowering
from service.runtime.backends import create_session
from service.runtime.providers import qnn_session_options

C, H = 16, 8
S_IN, S_OUT = 0.0009, 0.0008


def _conv_unit(g: dict, x: str, out: str, *, group: int = 1, stride: int = 1, bias: bool = True,
               zp_out: int = 32768, act=np.uint16, seed: int = 0):
    """DQ(x) -> Conv(DQ(int8 w), DQ(int32 b)) -> Q(out): one W8A16 node unit (8-bit activations with `act`)."""
    rng = np.random.default_rng(seed)
    k = 1 if group == 1 else 3
    w = rng.integers(-127, 128, (C, C // group, k, k)).astype(np.int8)
    s_w = rng.uniform(0.002, 0.01, C).astype(np.float32)
    g["inits"] += [numpy_helper.from_array(w, f"{out}.w"), numpy_helper.from_array(s_w, f"{out}.sw"),
                   numpy_helper.from_array(np.zeros(C, np.int8), f"{out}.zw"),
                   numpy_helper.from_array(np.array(S_OUT, np.float32), f"{out}.so"),
                   numpy_helper.from_array(np.array(zp_out, act), f"{out}.zo")]
    g["nodes"].append(helper.make_node("DequantizeLinear", [f"{out}.w", f"{out}.sw", f"{out}.zw"], [f"{out}.wf"],
                                       axis=0))
    ins = [x, f"{out}.wf"]
    if bias:
        g["inits"] += [numpy_helper.from_array(rng.integers(-5000, 5000, C).astype(np.int32), f"{out}.b"),
                       numpy_helper.from_array((np.float32(S_IN) * s_w).astype(np.float32), f"{out}.bs"),
                       numpy_helper.from_array(np.zeros(C, np.int32), f"{out}.bz")]
        g["nodes"].append(helper.make_node("DequantizeLinear", [f"{out}.b", f"{out}.bs", f"{out}.bz"],
                                           [f"{out}.bf"], axis=0))
        ins.append(f"{out}.bf")
    pad = [k // 2] * 4
    g["nodes"] += [helper.make_node("Conv", ins, [f"{out}.y"], name=out, group=group, strides=[stride, stride],
                                    pads=pad),
                   helper.make_node("QuantizeLinear", [f"{out}.y", f"{out}.so", f"{out}.zo"], [out])]


def _model(units: list[dict], act=np.uint16) -> onnx.ModelProto:
    """Input codes -> DQ -> the conv units side by side (each reads the input) -> their output codes."""
    elem = TensorProto.UINT16 if act == np.uint16 else TensorProto.UINT8
    g = {"nodes": [helper.make_node("DequantizeLinear", ["x", "s_in", "zp_in"], ["xf"])],
         "inits": [numpy_helper.from_array(np.array(S_IN, np.float32), "s_in"),
                   numpy_helper.from_array(np.array(20000 if act == np.uint16 else 100, act), "zp_in")]}
    outputs = []
    for i, unit in enumerate(units):
        _conv_unit(g, "xf", f"conv{i}", act=act, seed=i, **unit)
        size = H // unit.get("stride", 1)
        outputs.append(helper.make_tensor_value_info(f"conv{i}", elem, [1, C, size, size]))
    graph = helper.make_graph(g["nodes"], "units", [helper.make_tensor_value_info("x", elem, [1, C, H, H])],
                              outputs, g["inits"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _bias_codes(model: onnx.ModelProto, conv: str) -> np.ndarray:
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == conv)
    return numpy_helper.to_array(inits[producer[node.input[2]].input[0]]).astype(np.int64)


def test_bias_raised_by_the_units_per_kind_of_conv():
    units = [{}, {"bias": False}, {"zp_out": 0}, {"group": C, "stride": 2}, {"group": C}]
    model = _model(units)
    before = {f"conv{i}": _bias_codes(model, f"conv{i}") for i, u in enumerate(units) if u.get("bias", True)}
    assert htp_lowering.compensate_truncation(model, 200) == 4          # all but the stride-2 depthwise
    onnx.checker.check_model(model)
    assert np.array_equal(_bias_codes(model, "conv0"), before["conv0"] + 200)
    assert np.array_equal(_bias_codes(model, "conv1"), np.full(C, 200))
    assert np.array_equal(_bias_codes(model, "conv2"), before["conv2"] + 100)      # zero point 0: half
    assert np.array_equal(_bias_codes(model, "conv3"), before["conv3"])
    assert np.array_equal(_bias_codes(model, "conv4"), before["conv4"] + 200)
    # the created bias is in accumulator units: scale s_in * s_w per channel, as the HTP folds it
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(inits["conv1.htp_bias_scale"], np.float32(S_IN) * inits["conv1.sw"], rtol=1e-7)
    # still a valid QDQ graph the CPU EP runs: each output moves by the added units times M, no more
    x = {"x": np.random.default_rng(1).integers(15000, 25000, (1, C, H, H)).astype(np.uint16)}
    raw = ort.InferenceSession(_model(units).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    low = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert np.array_equal(raw[3], low[3])
    m = S_IN * inits["conv0.sw"] / S_OUT
    np.testing.assert_allclose((low[0].astype(np.float64) - raw[0]).mean(axis=(0, 2, 3)), 200 * m, atol=0.6)


def test_units_travel_in_the_metadata_and_only_they_lower_the_file(tmp_path):
    path = tmp_path / "conv.qdq.onnx"
    model = _model([{}, {"bias": False}])
    onnx.save(model, path)
    assert htp_lowering.lowered_bytes(path) is None                   # nothing recorded: compiled as it is
    htp_lowering.set_truncation_units(model, 160)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "other": "kept"})
    htp_lowering.set_truncation_units(model, 192)                        # replaces, keeps the rest
    onnx.save(model, path)
    assert htp_lowering.truncation_units(onnx.load(path)) == 192
    assert {p.key: p.value for p in onnx.load(path).metadata_props}["other"] == "kept"
    lowered = onnx.load_from_string(htp_lowering.lowered_bytes(path))
    assert np.array_equal(_bias_codes(lowered, "conv1"), np.full(C, 192))
    onnx.helper.set_model_props(model, {htp_lowering.METADATA_KEY: "lots"})
    with pytest.raises(ValueError, match=htp_lowering.METADATA_KEY):
        htp_lowering.truncation_units(model)


def test_other_graphs_are_left_as_they_are(tmp_path):
    eight_bit = _model([{"zp_out": 128}], act=np.uint8)
    assert htp_lowering.compensate_truncation(eight_bit, 192) == 0
    path = tmp_path / "float.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    htp_lowering.set_truncation_units(model, 192)
    onnx.save(model, path)
    assert htp_lowering.lowered_bytes(path) is None


@pytest.mark.parametrize("unit", [{}, {"bias": False}, {"group": C}], ids=["1x1", "1x1-no-bias", "depthwise"])
def test_emulator_truncates_and_the_session_compiles_the_lowered_graph(tmp_path, unit):
    """The premise, measured: the HTP's conv output is biased low against CPU QDQ; and `create_session` compiles
    what the metadata asks for (its output moves up by the units, as CPU QDQ of the lowered graph does)."""
    path = tmp_path / "conv.qdq.onnx"
    model = _model([unit])
    onnx.save(model, path)
    x = {"x": np.random.default_rng(2).integers(12000, 28000, (1, C, H, H)).astype(np.uint16)}
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0].astype(np.float64)
    so = qnn_session_options("qnn-emulator", disable_cpu_fallback=True)
    raw = ort.InferenceSession(str(path), sess_options=so).run(None, x)[0].astype(np.float64)
    assert (raw - cpu).mean() < -0.3, "the HTP no longer truncates as measured: re-measure htp_lowering"
    htp_lowering.set_truncation_units(model, 192)
    onnx.save(model, path)
    lowered = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False).run(None, x)[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    moved = (lowered.astype(np.float64) - raw).mean()
    expected = 192 * float(np.mean(S_IN * inits["conv0.sw"] / S_OUT))
    assert abs(moved - expected) < 0.25 * expected, (moved, expected)
