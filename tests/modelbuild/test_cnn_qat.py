"""Quantization-aware fine-tuning (cnn_qat) as a step of the CNN recipe, on a tiny MobileNet-style CNN whose
channel ranges differ as much as a batch-norm-folded network's: a few training steps must beat the
post-training recipe on held-out photos, measured on the written QDQ graph (CPU EP) against the ORIGINAL float
graph; the jax interpreter must compute what onnxruntime computes; without jax the recipe is the PTQ one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from service.modelbuild import cnn_ptq, cnn_qat, weight_codec
from service.modelbuild.graph import GraphBuilder
from service.runtime.backends import create_session
from tests.modelbuild.cnn_photos import calibration_and_held, features_sqnr

SIZE = 32
pytest.importorskip("jax", reason="the QAT step needs jax (the dev and bench extras install it)")


def _tiny_cnn(path) -> str:
    """stem 3x3/2 -> depthwise -> project, inverted residual block, 1x1 head; ReLU6; channel scales spread
    ~100x and large biases, as after batch-norm folding."""
    rng = np.random.default_rng(3)
    g = GraphBuilder("tiny_cnn")
    x = g.input("pixel_values", "float32", [1, 3, SIZE, SIZE])
    count = iter(range(100))

    def conv(x, cin, cout, k, stride=1, group=1, act=True):
        w = (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype(np.float32)
        w *= np.exp(rng.normal(0, 1.2, cout)).astype(np.float32)[:, None, None, None]
        b = rng.normal(0, 1.0, cout).astype(np.float32)
        name = f"c{next(count)}"
        y = g.op("Conv", [x, g.init(f"{name}.weight", w), g.init(f"{name}.bias", b)], name=name,
                 kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group)
        return g.op("Clip", [y, g.const(0.0), g.const(6.0)]) if act else y

    h = conv(x, 3, 16, 3, stride=2)
    h = conv(h, 16, 16, 3, group=16)
    h = conv(h, 16, 24, 1, act=False)
    r = conv(conv(conv(h, 24, 72, 1), 72, 72, 3, group=72), 72, 24, 1, act=False)
    h = g.op("Add", [h, r])
    g.output(conv(h, 24, 64, 1), "features", "float32", [1, 64, SIZE // 2, SIZE // 2])
    return str(g.save(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    path = _tiny_cnn(root / "tiny.float.onnx")
    return (root, path, *calibration_and_held(SIZE))


def test_jax_interpreter_computes_the_graph(tiny):
    from service.modelbuild.onnx_jax import graph_function
    _, path, _, held = tiny
    model = onnx.load(path)
    fn, _ = graph_function(model, [])
    got = np.asarray(fn({}, dict(held[0]), ["features"])["features"])
    want = create_session(path, "cpu").run(["features"], held[0])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_qat_step_beats_the_post_training_recipe_on_held_out_photos(tiny):
    root, path, calibration, held = tiny
    # both from the float-input rounding: from the quantized-input rounding (cnn_sequential, 43.8 dB here)
    # these 200 steps end at 43.6 dB, below their start
    ptq, _ = cnn_ptq.quantize_cnn(path, root / "ptq.onnx", calibration,
                                  recipe=cnn_ptq.CnnRecipe(split_budget=0.0, quantized_inputs=False))
    qat_recipe = cnn_qat.QatRecipe(steps=200, batch=8, eval_every=50, monitor=held[:4])
    qat, report = cnn_ptq.quantize_cnn(path, root / "qat.onnx", calibration, recipe=cnn_ptq.CnnRecipe(
        split_budget=0.0, quantized_inputs=False, qat=qat_recipe))
    figures = {"ptq_db": round(features_sqnr(path, ptq, held), 2), "qat_db": round(features_sqnr(path, qat, held), 2),
               **report.to_dict()}
    print(figures)
    assert report.qat["qat_steps"] == 200 and len(report.qat["qat_history"]) == 5, figures
    assert figures["qat_db"] > figures["ptq_db"], figures
    encodings = weight_codec.weight_encodings(onnx.load(str(qat)))          # still int8 per-channel everywhere
    assert encodings and all(e.per_channel and e.dtype == "int8" for e in encodings)


def test_without_jax_the_recipe_is_the_post_training_one(tiny, monkeypatch):
    root, path, calibration, held = tiny
    monkeypatch.setattr(cnn_qat, "available", lambda: False)
    recipe = cnn_ptq.CnnRecipe(split_budget=0.0, qat=cnn_qat.QatRecipe(steps=5))
    fallback, report = cnn_ptq.quantize_cnn(path, root / "fallback.onnx", calibration, recipe=recipe)
    plain, _ = cnn_ptq.quantize_cnn(path, root / "plain.onnx", calibration, recipe=cnn_ptq.CnnRecipe(split_budget=0.0))
    assert report.qat == {"qat_steps": 0}
    assert features_sqnr(path, fallback, held) == features_sqnr(path, plain, held)
