"""Weight scales the QNN HTP requantizes exactly (Conv, MatMul, Gemm).

The HTP computes a quantized Conv's output code as the int32 accumulator (zero points and bias folded in)
times one multiplier per output channel, M = s_in * s_w / s_out, and it holds M with 11 significant bits
(fp16's mantissa, any exponent). Measured on the emulator (bit-faithful, CPU fallback off) on real
EfficientNet-Lite0 layers: each channel's error against CPU QDQ is a gain that equals M's rounding error to
three digits (up to 2^-12), applied to the whole uint16 code *including its zero point*; so a signed output
(zero point near 32768) carries a constant offset of up to ~16 codes per channel. A plain W8A16 conv then
agrees with CPU QDQ to ~58 dB, which is harmless beside 8-bit weights but is the whole error of a split layer
(~15-bit weights), the reason deep splits lost half their gain on the HTP.

`align_requant_scales` moves each channel's weight scale by less than 2^-12 so that M is exactly one of
those values: the integers stay, the bias is re-encoded, and CPU QDQ computes what the HTP computes.

M also has floors. A channel whose M is below 2^-24, or below its output zero point x 2^-39 (the zero point
folded into the accumulator must stay under 2^39), comes out near its zero point or saturated, whatever its bias
and weights. Measured on one conv on the emulator: zero point 65535 is right at M = 2^-22.83 and 65,535 codes
off at 2^-23.83; 47,889 is right at 2^-23 and off at 2^-23.5; 16,384 is right at 2^-23.95; zero points 0 and
1000 are off at 2^-24.3. The same bound separates the good and the broken channels of six convs of PP-OCR's
detector through the CNN recipe, where near-dead filters (tiny weights, a real bias) have such multipliers.
Their scale is raised to 1.125 x the floor and their integers re-rounded, which costs such a channel under one code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .weight_codec import rescaled_integers, set_weight, weight_dequantizers
from service.runtime.htp_numerics import htp_multiplier
from service.runtime.onnx_graph import attribute, graph_index

MIN_MULTIPLIER = 2.0 ** -24             # the HTP's floors on M (module docstring) ...
ZERO_POINT_SHIFT = 2.0 ** -39           # ... and M >= output zero point x this
FLOOR_MARGIN = 1.125                    # what the floors are raised to: 1/8 above them (exact in 11 bits)


def _activation_scale(tensor: str, inits, producer, consumers) -> float | None:
    """The scale an activation is quantized with: its DequantizeLinear (conv input) or QuantizeLinear
    (conv output); None when it has none (e.g. a float graph output)."""
    quantization = _activation_quantization(tensor, inits, producer, consumers)
    return quantization and quantization[0]


def _activation_quantization(tensor: str, inits, producer, consumers) -> tuple[float, float] | None:
    """(scale, |zero point|) of an activation, found as `_activation_scale` finds the scale."""
    node = producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear":
        node = next((n for n in consumers.get(tensor, []) if n.op_type == "QuantizeLinear"), None)
    if node is None:
        return None
    scale = numpy_helper.to_array(inits[node.input[1]])
    if scale.size != 1:
        return None
    zero_point = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
    return float(scale), abs(float(np.asarray(zero_point).ravel()[0]))


def align_requant_scales(model: onnx.ModelProto) -> int:
    """In place: every quantized Conv/MatMul/Gemm weight's scales moved so that its requantization multipliers
    are exact on the HTP (MatMul measured the same as Conv: 62 -> 80 dB from CPU QDQ) and not under its floor.
    Returns the number of weights changed. All-zero channels above the floor, and weights whose scale is
    computed (LPBQ blocks), are left alone."""
    changed = 0
    inits, producer, consumers = graph_index(model.graph)       # set_weight rewrites initializers in place (CopyFrom)
    for weight, (dq, node) in weight_dequantizers(model).items():
        if dq.input[1] not in inits or attribute(dq, "block_size", 0):
            continue
        s_in = _activation_scale(node.input[0], inits, producer, consumers)
        output = _activation_quantization(node.output[0], inits, producer, consumers)
        if not s_in or not output or not output[0]:
            continue
        s_out, zero_point = output
        floor = max(MIN_MULTIPLIER, zero_point * ZERO_POINT_SHIFT) * FLOOR_MARGIN
        q = numpy_helper.to_array(inits[dq.input[0]])
        s_w = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        axis = attribute(dq, "axis", 1) % q.ndim if s_w.size > 1 else None
        rows = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1) if axis is not None else q.reshape(1, -1)
        live = np.abs(rows).max(axis=1) > 0
        m = (np.float32(s_in) * s_w.ravel() / np.float32(s_out)).astype(np.float64)
        floored = m < floor                        # all-zero channels too: their bias is still requantized
        m = np.maximum(m, floor)
        aligned = np.where(live | floored, (htp_multiplier(m) * s_out / s_in).astype(np.float32), s_w.ravel())
        if np.array_equal(aligned, s_w.ravel()):
            continue
        raised = floored & (aligned > s_w.ravel() * (1 + 2.0 ** -10))    # its integers re-rounded
        if raised.any():
            q = rescaled_integers(q, axis, np.where(raised, s_w.ravel() / aligned, 1.0), 8 * q.dtype.itemsize)
        set_weight(model, weight, q, aligned.reshape(s_w.shape))
        changed += 1
    return changed


_DATA_MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _exclusive_chain(dq: onnx.NodeProto, producer, consumers) -> list[onnx.NodeProto] | None:
    """The Q/DQ nodes from a Concat input's DequantizeLinear back through data moves to the op that computed the
    tensor, when each tensor on the way has that one use; None otherwise."""
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != 3:
        return None
    chain, node = [dq], dq
    while True:
        q = producer.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
            return None
        chain.append(q)
        src = producer.get(q.input[0])
        if src is None or len(consumers.get(src.output[0], [])) != 1:
            return None
        if src.op_type not in _DATA_MOVES:
            return chain                                  # reached the op that computed it (a Conv, ...)
        node = producer.get(src.input[0])
        if node is None or node.op_type != "DequantizeLinear" or len(consumers.get(node.output[0], [])) != 1:
            return None
        chain.append(node)


def share_concat_scales(model: onnx.ModelProto) -> int:
    """In place: a Concat input that only the Concat uses (through Transpose/Reshape/...) takes the Concat's
    output scale and zero point. QNN folds the Concat's requantization into the op that computed the input, so
    its multiplier becomes s_in * s_w / s_concat, which `align_requant_scales` cannot make exact for both scales;
    on face_short's classifier head one channel then came out 20 codes (0.49 logits) off. CPU QDQ loses nothing:
    the Concat requantizes to its own scale anyway. Returns the number of inputs changed."""
    inits, producer, consumers = graph_index(model.graph)
    changed = 0
    for cat in [n for n in model.graph.node if n.op_type == "Concat"]:
        outs = consumers.get(cat.output[0], [])
        if len(outs) != 1 or outs[0].op_type != "QuantizeLinear" or len(outs[0].input) < 3:
            continue
        s_cat, z_cat = (numpy_helper.to_array(inits[t]) for t in outs[0].input[1:3])
        for name in cat.input:
            dq = producer.get(name)
            chain = _exclusive_chain(dq, producer, consumers)
            if chain is None or any(n.input[1:3] != dq.input[1:3] for n in chain):
                continue
            s_name, z_name = dq.input[1], dq.input[2]
            if len(consumers[s_name]) != len(chain) or len(consumers[z_name]) != len(chain):
                continue                                  # the scale is shared beyond the chain
            if np.array_equal(numpy_helper.to_array(inits[s_name]), s_cat) and \
                    np.array_equal(numpy_helper.to_array(inits[z_name]), z_cat):
                continue
            inits[s_name].CopyFrom(numpy_helper.from_array(s_cat.copy(), s_name))
            inits[z_name].CopyFrom(numpy_helper.from_array(z_cat.copy(), z_name))
            changed += 1
    return changed


def align_file(path: str | Path, concat_scales: bool = False) -> int:
    """`align_requant_scales` on a QDQ model file, rewritten in place (with its external data file, if any);
    `concat_scales`: `share_concat_scales` first (the CNN recipe)."""
    path = Path(path)
    model = onnx.load(str(path))
    changed = share_concat_scales(model) if concat_scales else 0
    changed += align_requant_scales(model)
    if changed:
        save_beside_data(model, path)
    return changed


def save_beside_data(model: onnx.ModelProto, path: Path) -> None:
    """Rewrite the QDQ file at `path`, its weights in `<name>.data` again if they were there."""
    external = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=external.exists(), all_tensors_to_one_file=True,
                    location=external.name)
