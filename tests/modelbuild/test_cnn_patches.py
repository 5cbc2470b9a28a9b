"""The CNN recipe's conv input patches equal the convolution itself for every kernel layout the shipped models
use (square and non-square kernels and strides, explicit and SAME padding, dilation): a wrong patch layout gave
wrong GPTQ statistics, or failed the build (PP-OCR's recogniser has 2x1 strides)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from service.modelbuild.cnn_ptq import _patches


@pytest.mark.parametrize("kh,kw,strides,pads,dilations,auto", [
    (3, 3, [1, 1], [1, 1, 1, 1], [1, 1], None),
    (3, 3, [2, 1], [1, 1, 1, 1], [1, 1], None),
    (1, 3, [1, 1], [0, 1, 0, 1], [1, 1], None),
    (3, 3, [2, 2], None, [1, 1], "SAME_UPPER"),
    (3, 3, [1, 1], [2, 2, 2, 2], [2, 2], None),
    (2, 2, [2, 1], [0, 0, 0, 0], [1, 1], None),
])
def test_patches_times_weights_is_the_convolution(kh, kw, strides, pads, dilations, auto):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 11)).astype(np.float32)
    w = rng.standard_normal((5, 4, kh, kw)).astype(np.float32)
    attrs = {"kernel_shape": [kh, kw], "strides": strides, "dilations": dilations}
    attrs.update({"auto_pad": auto} if auto else {"pads": pads})
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", 1, x.shape)],
                              [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0][0]
    patches = _patches(x[0], node, kh, kw)                              # [C, kh*kw, P]
    got = (w.reshape(5, -1) @ patches.reshape(4 * kh * kw, -1)).reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4)
