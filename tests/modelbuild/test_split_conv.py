"""The split-conv graph form (split_conv: ~15-bit weights as two int8 convs, optionally only some output
channels) and the requantization scales the HTP computes exactly (htp_requant), on tiny graphs: the split is
the float layer, and on the QNN HTP emulator (CPU fallback disabled) a conv or MatMul with a signed output
parts from CPU QDQ by the HTP's 11-bit multipliers until its scales are aligned."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.modelbuild import cnn_ptq, htp_requant, qdq, split_conv, weight_codec
from service.runtime.backends import create_session
from service.runtime.onnx_graph import graph_index


def _conv_graph(path, rng, *, depthwise_too: bool = True):
    """A 3x3 conv (signed output: its zero point sits mid-range), then optionally a depthwise 3x3 and a 1x1."""
    def conv(name, x, shape, out, **attrs):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 1.2 / np.sqrt(np.prod(shape[1:])))
                                             .astype(np.float32), f"{name}.weight"))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape[0]) * 0.1).astype(np.float32), f"{name}.bias"))
        nodes.append(onnx.helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, **attrs))
        return out

    nodes, inits = [], []
    h = conv("a", "x", (32, 16, 3, 3), "y" if not depthwise_too else "a_out", pads=[1, 1, 1, 1])
    if depthwise_too:
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0), ("six", 6))]
        nodes.append(onnx.helper.make_node("Clip", [h, "zero", "six"], ["a_clip"], name="clip"))
        h = conv("dw", "a_clip", (32, 1, 3, 3), "dw_out", pads=[1, 1, 1, 1], group=32)
        conv("pw", h, (24, 32, 1, 1), "y")
    graph = onnx.helper.make_graph(nodes, "convs", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                     [1, 16, 12, 12])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def _feeds(rng, count):
    return [{"x": (rng.standard_normal((1, 16, 12, 12)) * 0.7 + 0.3).astype(np.float32)} for _ in range(count)]


def _split(path, out, choice: dict[str, np.ndarray | None]):
    model = onnx.load(str(path))
    weights = {n.name: numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[1]))
               for n in model.graph.node if n.op_type == "Conv"}
    named = {n.input[1]: n.name for n in model.graph.node if n.op_type == "Conv"}
    split_conv.split_layers(model, weights, {named[k]: v for k, v in choice.items()})
    onnx.save(model, str(out))
    return out


def _htp_and_cpu(path, feeds, name):
    cpu = [create_session(path, "cpu").run(None, f)[0] for f in feeds]
    session = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False, model_name=name)
    return cpu, [session.run(None, f)[0] for f in feeds]


def test_split_form_is_the_float_layer_and_its_hi_rows_are_on_the_int8_grid(tmp_path):
    rng = np.random.default_rng(0)
    path = _conv_graph(tmp_path / "convs.onnx", rng)
    channels = np.array([3, 7, 8, 30])
    split = _split(path, tmp_path / "split.onnx", {"a.weight": channels, "dw.weight": np.array([1, 2]),
                                                  "pw.weight": None})
    feeds = _feeds(rng, 2)
    for f in feeds:
        want = cnn_ptq.quiet_session(str(path)).run(None, f)[0]
        got = cnn_ptq.quiet_session(str(split)).run(None, f)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    model = onnx.load(str(split))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == "a.weight"))
    scale = weight_codec.channel_scale(w, 8, 0)[channels][:, None, None, None]
    np.testing.assert_allclose(inits["a.weight"][channels] / scale, np.rint(inits["a.weight"][channels] / scale),
                               atol=1e-3)
    others = np.setdiff1d(np.arange(32), channels)
    np.testing.assert_array_equal(inits["a.weight"][others], w[others])          # unsplit rows stay as given
    assert inits["a.weight.residual"].shape == (4, 16, 3, 3)                     # only the selected channels
    place = inits["a.weight.residual_place"][..., 0, 0]
    assert place.shape == (32, 4) and place.sum() == 4 and np.all(place[channels, np.arange(4)] == 1)
    assert inits["dw.weight.residual"].shape == (32, 1, 3, 3)                    # grouped: a row per channel
    assert not inits["dw.weight.residual"][np.array([0, 3, 31])].any()
    assert "pw.weight.residual_place" not in inits                               # every channel: no placing
    with pytest.raises(ValueError, match="channels"):
        split_conv.split_node(model, model.graph.node[0], w, np.array([32]))


def _matmul_graph(path, rng):
    """x [1, 16, 12, 12] @ W [12, 32]: a MatMul with a signed output, weights per-channel on axis 1."""
    w = numpy_helper.from_array((rng.standard_normal((12, 32)) / np.sqrt(12)).astype(np.float32), "a.weight")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "a.weight"], ["y"], name="a")], "matmul",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 12, 12])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_aligned_scales_make_the_htp_emulator_compute_a_layer_as_cpu_qdq(tmp_path, op):
    """The cause of the deep-split loss: the HTP holds each channel's requantization multiplier with 11
    significant bits. Before alignment a signed-output conv (or MatMul) parts from CPU QDQ by that; after,
    it does not, while the integers stay and the scales move by under 2^-11."""
    rng = np.random.default_rng(1)
    path = (_conv_graph(tmp_path / "conv.onnx", rng, depthwise_too=False) if op == "Conv"
            else _matmul_graph(tmp_path / "matmul.onnx", rng))
    calibration, held = _feeds(rng, 16), _feeds(rng, 2)
    plain = qdq.quantize_qdq(path, tmp_path / "conv.w8a16.onnx", calibration, "w8a16",
                             exact_scales=False)               # unaligned: what the step changes
    model = onnx.load(str(plain))
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert htp_requant.align_requant_scales(model) == 1
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(after["a.weight_quantized"], before["a.weight_quantized"])
    moved = np.abs(after["a.weight_scale"] / before["a.weight_scale"] - 1)
    assert moved.max() < 2.0 ** -11 and moved.max() > 0
    layer = next(n for n in model.graph.node if n.op_type == op)
    inits, producer, consumers = graph_index(model.graph)
    s_in, s_out = (htp_requant._activation_scale(t, inits, producer, consumers)
                   for t in (layer.input[0], layer.output[0]))
    multiplier = np.float32(s_in) * after["a.weight_scale"] / np.float32(s_out)
    np.testing.assert_allclose(htp_requant.htp_multiplier(multiplier), multiplier, rtol=1e-6)
    aligned = tmp_path / "conv.aligned.onnx"
    onnx.save(model, str(aligned))
    figures = {}
    for tag, graph in (("plain", plain), ("aligned", aligned)):
        cpu, htp = _htp_and_cpu(graph, held, f"{op}.{tag}")
        figures[tag] = round(qdq.sqnr_db(np.concatenate(cpu), np.concatenate(htp)), 2)
    print(json.dumps({f"{op}_htp_vs_cpu_db": figures}))
    assert figures["aligned"] > 70.0 and figures["aligned"] > figures["plain"] + 10.0, figures


def test_channel_subset_splits_run_on_the_htp_emulator_as_on_the_cpu(tmp_path):
    rng = np.random.default_rng(2)
    path = _conv_graph(tmp_path / "convs.onnx", rng)
    split = _split(path, tmp_path / "split.onnx", {"a.weight": np.array([0, 5, 6, 19]),
                                                  "dw.weight": np.array([4, 9]), "pw.weight": np.arange(0, 24, 3)})
    calibration, held = _feeds(rng, 16), _feeds(rng, 2)
    out = qdq.quantize_qdq(split, tmp_path / "split.w8a16.onnx", calibration, "w8a16", exact_scales=False)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(out)).graph.node)
    assert convs == 8 and htp_requant.align_file(out) == convs    # 3 main, 3 residual and 2 placing convs
    ref = [cnn_ptq.quiet_session(str(path)).run(None, f)[0] for f in held]
    cpu, htp = _htp_and_cpu(out, held, "split.channels")
    figures = {"cpu_db": round(qdq.sqnr_db(np.concatenate(ref), np.concatenate(cpu)), 2),
               "htp_db": round(qdq.sqnr_db(np.concatenate(ref), np.concatenate(htp)), 2),
               "htp_vs_cpu_db": round(qdq.sqnr_db(np.concatenate(cpu), np.concatenate(htp)), 2)}
    print(json.dumps({"channel_splits": figures}))
    assert figures["htp_vs_cpu_db"] > 60.0, figures
    assert abs(figures["htp_db"] - figures["cpu_db"]) < 0.1, figures
