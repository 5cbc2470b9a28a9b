"""Sequential rounding against the quantized network's own inputs (cnn_sequential, the CNN recipe's rounding
step): the least-squares correction cancels an input error that is linear in the input, and on a small deep CNN
the recipe with it beats the recipe that rounds against float inputs on held-out photos, measured on the
written QDQ graph (CPU EP) against the float graph, with and without split layers."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from service.modelbuild import cnn_ptq, cnn_sequential
from service.modelbuild.graph import GraphBuilder
from tests.modelbuild.cnn_photos import calibration_and_held, features_sqnr

SIZE = 32


def test_compensation_cancels_an_input_error_linear_in_the_input():
    rng = np.random.default_rng(0)
    k, p = 24, 4000
    x_q = rng.standard_normal((k, p)) * np.exp(rng.normal(0, 1, k))[:, None]
    mix = np.eye(k) + 0.05 * rng.standard_normal((k, k))          # x_f = mix @ x_q: the incoming error is linear
    x_f = mix @ x_q
    w = rng.standard_normal((8, k, 1, 1)).astype(np.float32)
    H, D = x_q @ x_q.T / p, (x_f - x_q) @ x_q.T / p
    star = cnn_sequential.compensated(w, H, D, damp=1e-9)
    np.testing.assert_allclose(star[:, :, 0, 0], w[:, :, 0, 0] @ mix, rtol=1e-3, atol=1e-4)
    # depthwise: one system per channel; without an incoming error nothing changes
    Hd = np.stack([np.eye(9) * (1 + c) for c in range(4)])
    wd = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(cnn_sequential.compensated(wd, Hd, np.zeros_like(Hd), damp=0.1), wd, rtol=1e-6)
    # damping pulls the correction towards the float weights
    far = cnn_sequential.compensated(w, H, D, damp=1e6)
    np.testing.assert_allclose(far, w, atol=1e-3)


def _deep_tiny_cnn(path) -> str:
    """A MobileNetV2-style stack deep enough for rounding errors to travel: stem 3x3/2, then inverted residual
    blocks (1x1 expand, depthwise 3x3, 1x1 project, residual Add where shapes allow), 1x1 head; ReLU6;
    per-channel weight scales spread ~100x with large biases, as after batch-norm folding."""
    rng = np.random.default_rng(7)
    g = GraphBuilder("deep_tiny_cnn")
    names = iter(f"conv{i}" for i in range(100))

    def conv(x, cin, cout, k, group=1, stride=1, relu6=True):
        w = rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        w = (w * np.exp(rng.normal(0, 1.2, cout))[:, None, None, None]).astype(np.float32)
        name = next(names)
        b = rng.normal(0, 1, cout).astype(np.float32)
        y = g.op("Conv", [x, g.init(f"{name}.weight", w), g.init(f"{name}.bias", b)], name=name,
                 kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        return g.op("Clip", [y, g.const(0.0), g.const(6.0)]) if relu6 else y

    h, width = conv(g.input("pixel_values", "float32", [1, 3, SIZE, SIZE]), 3, 16, 3, stride=2), 16
    for out, expand in ((16, 4), (24, 4), (24, 6), (32, 4)):
        y = conv(conv(conv(h, width, width * expand, 1), width * expand, width * expand, 3, group=width * expand),
                 width * expand, out, 1, relu6=False)
        h, width = (g.op("Add", [h, y]) if out == width else y), out
    g.output(conv(h, width, 96, 1), "features", "float32", [1, 96, SIZE // 2, SIZE // 2])
    return str(g.save(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    return (root, _deep_tiny_cnn(root / "tiny.float.onnx"), *calibration_and_held(SIZE))


@pytest.mark.parametrize("budget", [0.0, 0.15])
def test_rounding_against_quantized_inputs_beats_float_inputs_on_held_out_photos(tiny, budget):
    root, float_path, calibration, held = tiny
    figures = {"split_budget": budget}
    for key, quantized_inputs in (("float_inputs", False), ("quantized_inputs", True)):
        recipe = cnn_ptq.CnnRecipe(quantized_inputs=quantized_inputs, split_budget=budget)
        out, report = cnn_ptq.quantize_cnn(float_path, root / f"{key}.onnx", calibration, recipe=recipe)
        figures[key] = {"sqnr_db": round(features_sqnr(float_path, out, held), 2), "rounding": report.rounding,
                        "split": report.split, "bytes_above_8bit_pct": round(report.bytes_above_8bit_pct, 2)}
        convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
        int8 = {t.name for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8}
        assert len(convs) == 14 + len(report.split) and len(int8) >= len(convs), (key, len(convs), len(int8))
    print(json.dumps(figures))
    assert figures["float_inputs"]["rounding"] == "gptq"
    assert figures["quantized_inputs"]["rounding"] == "gptq-quantized-inputs"
    assert figures["float_inputs"]["split"] == figures["quantized_inputs"]["split"]      # the same layers split
    assert figures["quantized_inputs"]["sqnr_db"] > figures["float_inputs"]["sqnr_db"] + 0.2, figures
