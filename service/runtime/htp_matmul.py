"""A MatMul of two 16-bit activations, rewritten so that the QNN HTP computes it at 16 bits.

The HTP (v68, the SA8295P's) reads the second input of such a MatMul at 8 bits. Measured on the bit-faithful
emulator (CPU fallback off) on random uint16 codes: the error grows with the first input's amplitude and not with
the second's (the first kept exact: scaled down 128x it is exact to 0.35 codes); with both zero points at 32768
the HTP matches CPU QDQ computed with the second input's codes floored to `code // 257` (an 8-bit encoding of the
same range) to 1.7 codes rms, where CPU QDQ's own result is 9.9 codes away (45 dB); with other encodings the
grid's phase differs (not pinned down). That is the attention of PP-OCR's recognizer (Q K^T and P V; each 32-41 dB
alone) and of any decoder's attention on the NPU.

`split_activation_matmuls` writes `A @ B` as `A @ B_hi + A @ B_lo`: B_hi is B quantized to uint8 on that same
8-bit grid (scale 257 s_b), which the HTP reads exactly; B_lo = B - B_hi is at most about 129 of B's steps, held
in uint16 at s_b / 128, so the HTP's 8-bit reading of it costs about 2 of B's steps instead of 257. The Sub
takes B_hi re-encoded in uint16 at 257 s_b / 256 (exactly, whatever B's zero point; multipliers 128 and 128.5,
both exact): with the uint8 tensor itself as its input, QNN failed to finalize the graph (MEM_ALLOC) when B came
out of a Transpose (the recognizer's K^T, perm 0,2,3,1). The two products are summed by one Add into the
MatMul's own output encoding (A @ B_lo at a quarter of its step), each product's scale moved by under 2^-12 so
that its multiplier is exact. CPU QDQ of the original graph stays the model; only what the HTP compiles is
rewritten (`htp_lowering.lowered_bytes`).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.runtime.htp_numerics import htp_multiplier
from service.runtime.onnx_graph import graph_index

EIGHT_BIT_STEP = 257            # the HTP's 8-bit grid on a uint16 input: one step per 257 codes
LOW_PART_SHIFT = 128            # B_lo's step: s_b / 128 (range +-256 steps of B, room for B_hi's rounding)
LOW_PRODUCT_SHIFT = 4           # A @ B_lo's step: the output's / 4 (range a quarter of the output's)
SPLIT_MARK = ".htp_split_"      # in the two products' names: A @ B_lo reads B_lo at 8 bits by design, not split again


def _uint16_encoding(node, inits) -> tuple[float, int] | None:
    """(scale, zero point) of a DequantizeLinear/QuantizeLinear with a scalar uint16 encoding, else None."""
    if node is None or len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    scale, zero_point = (numpy_helper.to_array(inits[name]) for name in node.input[1:3])
    if scale.size != 1 or zero_point.size != 1 or zero_point.dtype != np.uint16:
        return None
    return float(scale.ravel()[0]), int(zero_point.ravel()[0])


def _activation_matmuls(model: onnx.ModelProto) -> list[tuple]:
    """(matmul, A's scale, B's encoding, the output's encoding, the output's zero-point name) of every MatMul
    whose two inputs are uint16 activations (not initializers) and whose output only a uint16 QuantizeLinear
    reads."""
    inits, producer, consumers = graph_index(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or SPLIT_MARK in node.name:
            continue
        dq_a, dq_b = (producer.get(name) for name in node.input[:2])
        outs = consumers.get(node.output[0], [])
        if not all(dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in inits
                   for dq in (dq_a, dq_b)) or len(outs) != 1 or outs[0].op_type != "QuantizeLinear":
            continue
        a, b, y = (_uint16_encoding(n, inits) for n in (dq_a, dq_b, outs[0]))
        if a is None or b is None or y is None:
            continue
        found.append((node, a[0], b, y, outs[0].input[2]))
    return found


def _exact_output_scale(s_a, s_b, s_y) -> np.float32:
    """An output scale within 2^-12 of `s_y` whose multiplier s_a s_b / scale the HTP holds exactly: an inexact one
    is a gain on the whole output code, its zero point included (measured: 6-16 codes on the recognizer's
    products, as for convs: modelbuild/htp_requant.py). The Add that sums the two products then reads them
    with multipliers that round to exactly 1 and 1/4."""
    m = np.float64(np.float32(s_a)) * np.float64(s_b) / np.float64(s_y)
    return np.float32(np.float64(np.float32(s_a)) * np.float64(s_b) / htp_multiplier(m))


def _qdq(tensor: str, scale: str, zero: str, out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{out}_q"], name=f"{out}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{out}_q", scale, zero], [out], name=f"{out}_DequantizeLinear")]


def _split_nodes(name: str, a: str, b: str, y: str, c: dict[str, str]) -> list[onnx.NodeProto]:
    """A @ B_hi + A @ B_lo into `y`; `c`: the encodings' initializer names."""
    return (_qdq(b, c["hi_scale"], c["hi_zero"], f"{name}.b_hi")
            + _qdq(f"{name}.b_hi", c["hi16_scale"], c["hi16_zero"], f"{name}.b_hi16")
            + [helper.make_node("Sub", [b, f"{name}.b_hi16"], [f"{name}.b_lo_f"], name=f"{name}.b_lo_Sub")]
            + _qdq(f"{name}.b_lo_f", c["lo_scale"], c["mid_zero"], f"{name}.b_lo")
            + [helper.make_node("MatMul", [a, f"{name}.b_hi"], [f"{name}.y_hi_f"], name=f"{name}{SPLIT_MARK}hi")]
            + _qdq(f"{name}.y_hi_f", c["out_scale"], c["out_zero"], f"{name}.y_hi")
            + [helper.make_node("MatMul", [a, f"{name}.b_lo"], [f"{name}.y_lo_f"], name=f"{name}{SPLIT_MARK}lo")]
            + _qdq(f"{name}.y_lo_f", c["lo_out_scale"], c["mid_zero"], f"{name}.y_lo")
            + [helper.make_node("Add", [f"{name}.y_hi", f"{name}.y_lo"], [y], name=f"{name}.sum")])


def split_activation_matmuls(model: onnx.ModelProto) -> int:
    """In place: every 16-bit x 16-bit MatMul as A @ B_hi + A @ B_lo (module docstring). Returns how many."""
    graph = model.graph
    found = _activation_matmuls(model)
    for node, s_a, (s_b, z_b), (s_y, _), out_zero in found:
        name = node.name or node.output[0]
        hi, lo = np.float32(s_b * EIGHT_BIT_STEP), np.float32(s_b / LOW_PART_SHIFT)
        hi_zero = int(np.clip(round(z_b / EIGHT_BIT_STEP), 0, 255))
        constants = {"hi_scale": hi, "hi_zero": np.uint8(hi_zero),
                     "hi16_scale": np.float32(hi / 256), "hi16_zero": np.uint16(hi_zero * 256 + 127),
                     "lo_scale": lo, "mid_zero": np.uint16(32768),
                     "out_scale": _exact_output_scale(s_a, hi, s_y),
                     "lo_out_scale": _exact_output_scale(s_a, lo, s_y / LOW_PRODUCT_SHIFT)}
        graph.initializer.extend(numpy_helper.from_array(np.array(v), f"{name}.{k}") for k, v in constants.items())
        names = {k: f"{name}.{k}" for k in constants} | {"out_zero": out_zero}
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(_split_nodes(name, node.input[0], node.input[1], node.output[0], names)):
            graph.node.insert(at + offset, new)
    return len(found)


def has_activation_matmuls(model: onnx.ModelProto) -> bool:
    return bool(_activation_matmuls(model))
