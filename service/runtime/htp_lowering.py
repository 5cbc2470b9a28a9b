"""What a QDQ graph needs before the QNN HTP compiles it: compensation of the HTP's truncating requantization, and
MatMuls of two 16-bit activations split so that the HTP does not read the second at 8 bits (htp_matmul.py).

The HTP does not round a W8A16 conv's accumulator to its output code as QDQ arithmetic (and the CPU EP) does:
it drops low accumulator bits by truncation on the way. Measured on the bit-faithful emulator (CPU fallback
off): a lone conv with zero input and a zero point on its output comes out as floor((bias + zp_out / M) / 256)
* 256 * M, and with data about 250-510 accumulator units (one unit = s_in * s_w) per output are lost, by kernel
(1x1, depthwise, channel count); a stride-2 depthwise conv is exact. So every conv's output is biased low by a
fraction of a code to a few codes, and the bias adds up through a network's residual stream: face_short's
logits sat 1.7 dB (HTP) below their CPU-QDQ figure.

`compensate_truncation` raises each such conv's int32 bias (creating one where the conv has none) by `units`
accumulator units, half that where the output's zero point is 0 (after a ReLU), nothing for stride-2
depthwise. A lone conv's loss is not what a whole graph loses (QNN fuses a conv with what follows), so `units`
is fitted per model at build time on the emulator (service/modelbuild/htp_truncation.py) and carried in the
QDQ file's metadata (`METADATA_KEY`); a file without it compiles as it is.

The QDQ graph itself stays the exact model, so CPU QDQ still computes what the recipe meant; only what the HTP
compiles is changed, which is why this lives with the backends (every QNN compile goes through `lowered_bytes`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.runtime import htp_matmul
from service.runtime.onnx_graph import attribute, graph_index

VERSION = "truncation-v1+matmul-split-v1"          # part of the QNN context-cache key: a change here recompiles
METADATA_KEY = "incar.htp_truncation_units"


def _scalar_zero_point(node, inits) -> np.ndarray | None:
    if node is None or len(node.input) < 3 or node.input[2] not in inits:
        return None
    zp = numpy_helper.to_array(inits[node.input[2]])
    return zp if zp.size == 1 else None


def _units(inits, producer, consumers, graph) -> list[tuple]:
    """(conv, input DQ, weight DQ, bias DQ or None, output zero point) of every W8A16 conv with uint16
    activations."""
    found = []
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        dq_x, dq_w = producer.get(conv.input[0]), producer.get(conv.input[1])
        outs = consumers.get(conv.output[0], [])
        if not (dq_x is not None and dq_x.op_type == "DequantizeLinear" and dq_x.input[0] not in inits
                and dq_w is not None and dq_w.op_type == "DequantizeLinear" and dq_w.input[0] in inits
                and len(outs) == 1 and outs[0].op_type == "QuantizeLinear"):
            continue
        zp_in, zp_out = _scalar_zero_point(dq_x, inits), _scalar_zero_point(outs[0], inits)
        weights = numpy_helper.to_array(inits[dq_w.input[0]])
        if zp_in is None or zp_out is None or zp_in.dtype != np.uint16 or zp_out.dtype != np.uint16 \
                or weights.dtype != np.int8:
            continue
        dq_b = producer.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if dq_b is not None and (dq_b.op_type != "DequantizeLinear" or dq_b.input[0] not in inits
                                 or numpy_helper.to_array(inits[dq_b.input[0]]).dtype != np.int32):
            continue
        found.append((conv, dq_x, dq_w, dq_b, int(zp_out)))
    return found


def truncation_units(model: onnx.ModelProto) -> int:
    """The accumulator units the model's build measured for its HTP compile (0: none recorded)."""
    value = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), "0")
    try:
        units = int(value)
    except ValueError:
        raise ValueError(f"model metadata {METADATA_KEY}={value!r} is not an integer") from None
    if not 0 <= units < 2**16:
        raise ValueError(f"model metadata {METADATA_KEY}={units} is outside 0..65535")
    return units


def set_truncation_units(model: onnx.ModelProto, units: int) -> None:
    """Record `units` in the model's metadata (replacing an earlier value)."""
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: str(int(units))})


def compensate_truncation(model: onnx.ModelProto, units: int) -> int:
    """In place: every eligible conv's bias raised by `units` accumulator units (`units // 2` where the output's
    zero point is 0). Returns the number of convs changed."""
    if units <= 0:
        return 0
    graph = model.graph
    inits, producer, consumers = graph_index(graph)
    changed = 0
    for conv, dq_x, dq_w, dq_b, zp_out in _units(inits, producer, consumers, graph):
        weights = numpy_helper.to_array(inits[dq_w.input[0]])
        group = int(attribute(conv, "group", 1))
        if group > 1 and group == weights.shape[0] and max(attribute(conv, "strides", [1])) > 1:
            continue                                     # stride-2 depthwise: exact on the HTP
        added = units // 2 if zp_out == 0 else units
        channels = weights.shape[0]
        if dq_b is not None and len(consumers.get(dq_b.output[0], [])) == 1 \
                and len(consumers.get(dq_b.input[0], [])) == 1:
            bias = inits[dq_b.input[0]]
            raised = numpy_helper.to_array(bias).astype(np.int64) + added
            bias.CopyFrom(numpy_helper.from_array(np.clip(raised, -2**31, 2**31 - 1).astype(np.int32), bias.name))
        else:                                            # no bias (or a shared one): a bias of its own
            s_in = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float32)
            s_w = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float32).reshape(-1)
            old = np.zeros(channels, np.int64)
            if dq_b is not None:
                old = numpy_helper.to_array(inits[dq_b.input[0]]).astype(np.int64).reshape(-1)
            name = f"{conv.name or conv.output[0]}.htp_bias"
            graph.initializer.extend([
                numpy_helper.from_array(np.clip(old + added, -2**31, 2**31 - 1).astype(np.int32),
                                        f"{name}_quantized"),
                numpy_helper.from_array(np.broadcast_to(s_in * s_w, (channels,)).astype(np.float32), f"{name}_scale"),
                numpy_helper.from_array(np.zeros(channels, np.int32), f"{name}_zero_point")])
            dq = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                  [name], name=f"{name}_DequantizeLinear", axis=0)
            graph.node.insert(list(graph.node).index(conv), dq)
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = name
        changed += 1
    return changed


def lowered_bytes(model_path: str | Path) -> bytes | None:
    """The model as the HTP should compile it, or None when lowering changes nothing (no truncation units recorded
    or no W8A16 conv, and no 16-bit x 16-bit MatMul: float graphs, CPU variants): then the file is compiled as it
    is."""
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)      # one parse; weights read only if needed
    units = truncation_units(model)
    convs = bool(units) and any(n.op_type == "Conv" for n in model.graph.node)
    if not convs and not htp_matmul.has_activation_matmuls(model):
        return None
    onnx.load_external_data_for_model(model, str(model_path.parent))
    changed = (compensate_truncation(model, units) if convs else 0) + htp_matmul.split_activation_matmuls(model)
    return model.SerializeToString() if changed else None
