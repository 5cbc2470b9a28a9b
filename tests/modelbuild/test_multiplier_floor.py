"""htp_requant's floors on the requantization multiplier M = s_in * s_w / s_out: the HTP loses a channel whose M is
under 2^-24 or under its output zero point x 2^-39, whatever its weights and bias (a near-dead filter: tiny
weights, a real bias, as PP-OCR's detector has through the CNN recipe). One W8A16 conv, written as QDQ by hand,
on the emulator with CPU fallback off: before `align_requant_scales` such channels are whole ranges off, after it
every channel is within a few codes of CPU QDQ, and the floored channels' CPU QDQ moves by under a code."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.modelbuild import htp_requant
from service.runtime.backends import create_session

C_IN, SIZE = 16, 8
S_IN, ZP_IN = 4.0 / 65535, 32768
S_OUT, ZP_OUT = 4.0 / 65535, 47889          # an asymmetric output: its zero point sets the second floor
# per output channel: weight scale as a multiplier M (log2), bias in output codes, all-zero weights?
CHANNELS = [(-6.6, 300.0, False),           # an ordinary channel
            (-23.5, 900.0, False),          # near-dead: 47889 / M = 2^39.05, over the zero-point floor
            (-24.5, -400.0, False),         # under the 2^-24 floor as well
            (-40.0, 50.0, True)]            # a dead filter with a tiny scale: only its bias is left


def _conv(path):
    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (len(CHANNELS), C_IN, 3, 3)).astype(np.int8)
    s_w = np.array([2.0 ** m * S_OUT / S_IN for m, _, _ in CHANNELS], np.float32)
    for c, (_, _, dead) in enumerate(CHANNELS):
        if dead:
            weights[c] = 0
    s_b = (S_IN * s_w.astype(np.float64)).astype(np.float32)
    bias = np.rint([b * S_OUT / s for (_, b, _), s in zip(CHANNELS, s_b.astype(np.float64))])
    inits = [numpy_helper.from_array(np.array(S_IN, np.float32), "s_in"),
             numpy_helper.from_array(np.array(ZP_IN, np.uint16), "zp_in"),
             numpy_helper.from_array(np.array(S_OUT, np.float32), "s_out"),
             numpy_helper.from_array(np.array(ZP_OUT, np.uint16), "zp_out"),
             numpy_helper.from_array(weights, "w_q"), numpy_helper.from_array(s_w, "s_w"),
             numpy_helper.from_array(np.zeros(len(CHANNELS), np.int8), "zp_w"),
             numpy_helper.from_array(np.clip(bias, -2 ** 31, 2 ** 31 - 1).astype(np.int32), "b_q"),
             numpy_helper.from_array(s_b, "s_b"), numpy_helper.from_array(np.zeros(len(CHANNELS), np.int32), "zp_b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_in", "zp_in"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s_in", "zp_in"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["w"], axis=0),
             helper.make_node("DequantizeLinear", ["b_q", "s_b", "zp_b"], ["b"], axis=0),
             helper.make_node("Conv", ["x_dq", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s_out", "zp_out"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "s_out", "zp_out"], ["out"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                            [1, C_IN, SIZE, SIZE])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT,
                                                             [1, len(CHANNELS), SIZE, SIZE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, str(path))
    return model


def _codes_off(path, x) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: the largest |HTP - CPU QDQ| in output codes; and the CPU QDQ output."""
    cpu = create_session(path, "cpu").run(None, {"x": x})[0]
    htp = create_session(path, "qnn-emulator", disable_cpu_fallback=True, context_cache=False).run(None, {"x": x})[0]
    return np.abs(htp - cpu).reshape(len(CHANNELS), -1).max(axis=1) / S_OUT, cpu


def test_multipliers_under_the_floors_are_raised_and_the_htp_keeps_the_channel(tmp_path):
    x = np.random.default_rng(1).uniform(-2, 2, (1, C_IN, SIZE, SIZE)).astype(np.float32)
    model = _conv(tmp_path / "raw.onnx")
    before, cpu_before = _codes_off(tmp_path / "raw.onnx", x)
    assert before[0] < 16 and (before[1:] > 1000).all(), before        # the trap: whole ranges off

    assert htp_requant.align_requant_scales(model) == 1
    onnx.save(model, str(tmp_path / "aligned.onnx"))
    s_w = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "s_w").astype(np.float64)
    floor = max(htp_requant.MIN_MULTIPLIER, ZP_OUT * htp_requant.ZERO_POINT_SHIFT)
    assert (S_IN * s_w / S_OUT >= floor).all()
    after, cpu_after = _codes_off(tmp_path / "aligned.onnx", x)
    assert (after < 16).all(), after                                   # each channel within a few codes
    moved = np.abs(cpu_after - cpu_before)[0, 1:].max() / S_OUT         # (channel 0 only moves to an exact M)
    assert moved <= 1.0, moved                                         # re-rounding costs under a code
