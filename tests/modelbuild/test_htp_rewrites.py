"""htp_rewrites.fold_bias_adds: a ConvTranspose whose bias is a separate Add of a [1, C, 1, 1] constant (as
paddle2onnx writes PP-OCR's detector) is computed wrongly by the QNN HTP; folded into the conv it is the
same float function and the emulator (CPU fallback disabled) computes it as CPU QDQ does."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.modelbuild import cnn_ptq, htp_rewrites, qdq
from service.runtime.backends import create_session

C_IN, C_OUT, SIZE = 16, 24, 16


def _upsampler(path, rng, bias_shape=(1, C_OUT, 1, 1)):
    """ConvTranspose (2x2, stride 2) -> Add(bias constant) -> Relu, then a Conv -> Add(constant) -> Relu."""
    inits = [numpy_helper.from_array((rng.standard_normal((C_IN, C_OUT, 2, 2)) * 0.3).astype(np.float32), "up.weight"),
             numpy_helper.from_array((rng.standard_normal(bias_shape) * 0.4).astype(np.float32), "up.bias"),
             numpy_helper.from_array((rng.standard_normal((8, C_OUT, 1, 1)) * 0.3).astype(np.float32), "head.weight"),
             numpy_helper.from_array((rng.standard_normal((1, 8, 1, 1)) * 0.2).astype(np.float32), "head.bias")]
    nodes = [helper.make_node("ConvTranspose", ["x", "up.weight"], ["up"], name="up", strides=[2, 2],
                              kernel_shape=[2, 2]),
             helper.make_node("Add", ["up", "up.bias"], ["up_b"], name="up_add"),
             helper.make_node("Relu", ["up_b"], ["up_r"], name="up_relu"),
             helper.make_node("Conv", ["up_r", "head.weight"], ["head"], name="head"),
             helper.make_node("Add", ["head", "head.bias"], ["y"], name="head_add")]
    graph = helper.make_graph(nodes, "upsampler", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                 [1, C_IN, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def _feeds(rng, count):
    return [{"x": np.maximum(rng.standard_normal((1, C_IN, SIZE, SIZE)) + 0.3, 0).astype(np.float32)}
            for _ in range(count)]


def test_folded_bias_is_the_same_float_graph_and_skips_what_is_not_a_channel_bias(tmp_path):
    rng = np.random.default_rng(0)
    path = _upsampler(tmp_path / "up.onnx", rng)
    model = onnx.load(str(path))
    assert htp_rewrites.fold_bias_adds(model) == 2
    assert [n.op_type for n in model.graph.node] == ["ConvTranspose", "Relu", "Conv"]
    assert {t.name for t in model.graph.initializer} == {"up.weight", "head.weight", "up.folded_bias",
                                                         "head.folded_bias"}
    for feed in _feeds(rng, 2):
        want = cnn_ptq.quiet_session(str(path)).run(None, feed)[0]
        got = cnn_ptq.quiet_session(model.SerializeToString()).run(None, feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a [C] constant broadcasts along W, not channels: not a bias, left alone
    other = onnx.load(str(_upsampler(tmp_path / "w_bias.onnx", np.random.default_rng(1), bias_shape=(C_OUT,))))
    assert htp_rewrites.fold_bias_adds(other) == 1 and other.graph.node[1].op_type == "Add"


def test_folded_transposed_conv_bias_runs_on_the_htp_emulator_as_on_the_cpu(tmp_path):
    rng = np.random.default_rng(3)
    path = _upsampler(tmp_path / "up.onnx", rng)
    folded = onnx.load(str(path))
    htp_rewrites.fold_bias_adds(folded)
    folded_path = tmp_path / "up.folded.onnx"
    onnx.save(folded, str(folded_path))
    calibration, held = _feeds(rng, 8), _feeds(rng, 2)
    ref = np.concatenate([cnn_ptq.quiet_session(str(path)).run(None, f)[0] for f in held])
    figures = {}
    for tag, graph in (("as_exported", path), ("folded", folded_path)):
        out = qdq.quantize_qdq(graph, tmp_path / f"{tag}.w8a16.onnx", calibration, "w8a16")
        cpu = np.concatenate([create_session(out, "cpu").run(None, f)[0] for f in held])
        session = create_session(out, "qnn-emulator", disable_cpu_fallback=True, context_cache=False, model_name=tag)
        htp = np.concatenate([session.run(None, f)[0] for f in held])
        figures[tag] = {"cpu_db": round(qdq.sqnr_db(ref, cpu), 2), "htp_db": round(qdq.sqnr_db(ref, htp), 2)}
    print(json.dumps({"transposed_conv_bias": figures}))     # as exported, the HTP was ~30 dB below the CPU
    assert figures["folded"]["cpu_db"] > 35.0, figures
    assert abs(figures["folded"]["htp_db"] - figures["folded"]["cpu_db"]) < 0.5, figures
    assert figures["folded"]["htp_db"] > figures["as_exported"]["htp_db"], figures
