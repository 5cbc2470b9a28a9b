"""HardSigmoid's output in the encoding the HTP computes it in (qdq.FIXED_OUTPUT_ENCODINGS), as onnxruntime's QNN
config already does for Sigmoid and Tanh. The HTP computes a HardSigmoid's uint16 output as f(x) x 65536 whatever
scale the graph gives it: inside a graph it then requantizes to that scale (a second rounding CPU QDQ does not do),
and where the codes leave the graph as they are they read back too small by the calibrated range (PP-OCR's
squeeze-excitation gates: [0, 0.61], so 0.61x). Emulator, CPU fallback off."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.modelbuild import qdq
from service.runtime.backends import create_session


def _gate(path):
    """x -> HardSigmoid (PP-OCR's alpha 1/6) as an op of its own, not behind a conv (QNN fuses a conv's activation
    and then honours the graph's encoding); a 1x1 conv on another branch gives the quantizer a weight."""
    w = np.random.default_rng(0).normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("HardSigmoid", ["x"], ["gate"], alpha=1 / 6, beta=0.5),
             helper.make_node("Conv", ["x", "w"], ["features"])]
    shape = [1, 8, 4, 4]
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("gate", TensorProto.FLOAT, shape),
                               helper.make_tensor_value_info("features", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))


def test_hardsigmoid_output_takes_the_htp_encoding_and_the_emulator_agrees(tmp_path):
    _gate(tmp_path / "float.onnx")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.uniform(-3.4, 0.7, (1, 8, 4, 4)).astype(np.float32)} for _ in range(16)]   # gate <= 0.62
    qdq.quantize_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", samples)
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    hs = next(n for n in model.graph.node if n.op_type == "HardSigmoid")
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == hs.output[0])
    assert float(inits[q.input[1]]) == np.float32(1 / 65536) and int(inits[q.input[2]]) == 0

    # the gate's codes as the graph's output (the DequantizeLinear after them dropped)
    del model.graph.output[0]
    model.graph.output.insert(0, helper.make_tensor_value_info(q.output[0], TensorProto.UINT16, [1, 8, 4, 4]))
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
                                 and n.input[0] == q.output[0]))
    onnx.save(model, str(tmp_path / "codes.onnx"))
    x = {"x": rng.uniform(-3.4, 0.7, (1, 8, 4, 4)).astype(np.float32)}
    cpu = create_session(tmp_path / "codes.onnx", "cpu").run(None, x)[0].astype(np.float64)
    htp = create_session(tmp_path / "codes.onnx", "qnn-emulator", disable_cpu_fallback=True,
                         context_cache=False).run(None, x)[0].astype(np.float64)
    # with the calibrated range [0, 0.62] the HTP's codes were 0.62x CPU QDQ's, thousands of codes off
    assert np.abs(htp - cpu).max() <= 2, np.abs(htp - cpu).max()


def test_sigmoid_like_ops_of_every_shipped_perception_graph_have_the_fixed_encoding():
    import os
    from pathlib import Path
    graphs = sorted((Path(os.environ.get("INCAR_MODELS_DIR", "build/models")) / "perception").glob("*.qdq.onnx"))
    assert graphs
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type not in ("HardSigmoid", "Sigmoid"):
                continue
            q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0])
            scale, zero = (numpy_helper.to_array(inits[name]) for name in q.input[1:3])
            assert float(scale) == np.float32(1 / 65536) and int(zero) == 0, (path.name, node.name, scale, zero)
