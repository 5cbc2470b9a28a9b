"""A split conv layer: ~15-bit weights as two int8 convs, for NPUs that refuse 16-bit weights (the HTP v68).

Conv(x, W, b) becomes Add(Conv(x, s1 q1, b), Conv(x, W - s1 q1)): q1 is W on its int8 per-channel grid and
the residual conv's int8 grid is ~254x finer, so the sum carries ~15 effective bits. With `channels`, only
those output channels are split: the main conv keeps every channel (the others stay plain int8), the
residual conv computes only the selected ones, and a 1x1 conv with a fixed 0/1 [C, C_sel] matrix puts them
back in place (exact at int8: its weights are 1 or 0). Depthwise and other grouped convs keep a residual row
for every channel (zero where not selected: k*k bytes each), because their input channels go with them.

The HTP computes this form as CPU QDQ does once the convs' requantization multipliers are exact
(`htp_requant.align_requant_scales`, run on the quantized graph): without that, its 11-bit multipliers put
each conv ~58 dB from CPU QDQ, which is the whole error of a split layer.
"""
from __future__ import annotations

import numpy as np
import onnx

from .weight_codec import _replace_init, channel_scale, round_to_grid
from service.runtime.onnx_graph import attribute


def split_weights(w: np.ndarray, channels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hi, residual): hi is `w` with the selected rows on their int8 per-channel grid (other rows as
    given), residual = w - hi on the selected rows, [C_sel, ...]."""
    rows = np.arange(w.shape[0]) if channels is None else np.asarray(channels, np.int64)
    scale = channel_scale(w, 8, 0)
    hi = w.astype(np.float32).copy()
    hi[rows] = round_to_grid(w[rows], scale[rows], 8, 0) * scale[rows][:, None, None, None]
    return hi, (w[rows] - hi[rows]).astype(np.float32)


def split_node(model: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray,
               channels: np.ndarray | None = None) -> list[onnx.NodeProto]:
    """Write the split of Conv `node` (float weights `w`, [C, C_in/g, kh, kw]) into `model`'s initializers
    and return the nodes that replace `node`, in order; its output keeps its name. `channels`: the output
    channels to split (default all)."""
    if channels is not None:
        channels = np.unique(np.asarray(channels, np.int64))
        if channels.size == 0 or channels[0] < 0 or channels[-1] >= w.shape[0]:
            raise ValueError(f"split_node {node.name}: channels must be a non-empty subset of 0..{w.shape[0] - 1}")
        if channels.size == w.shape[0]:
            channels = None
    hi, residual = split_weights(w, channels)
    grouped = attribute(node, "group", 1) > 1
    if grouped and channels is not None:       # a residual row per channel: zero where not selected
        full = np.zeros_like(w, dtype=np.float32)
        full[channels] = residual
        residual, channels = full, None
    out, lo_name = node.output[0], node.input[1] + ".residual"
    _replace_init(model, node.input[1], hi)
    _replace_init(model, lo_name, residual)
    main = onnx.NodeProto()
    main.CopyFrom(node)
    main.output[0] = out + "_hi"
    lo = onnx.NodeProto()
    lo.CopyFrom(node)
    lo.name, lo.output[0] = node.name + "_residual", out + "_lo"
    del lo.input[2:]
    lo.input[1] = lo_name
    nodes = [main, lo]
    if channels is not None:                   # the selected channels' residuals back in place
        place_name = node.input[1] + ".residual_place"
        place = np.zeros((w.shape[0], channels.size, 1, 1), np.float32)
        place[channels, np.arange(channels.size)] = 1.0
        _replace_init(model, place_name, place)
        nodes.append(onnx.helper.make_node("Conv", [out + "_lo", place_name], [out + "_lo_placed"],
                                           name=node.name + "_residual_place"))
    nodes.append(onnx.helper.make_node("Add", [out + "_hi", nodes[-1].output[0]], [out], name=node.name + "_sum"))
    return nodes


def split_layers(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                 channels: dict[str, np.ndarray | None]) -> None:
    """In place: each Conv named in `channels` split (`split_node`) with its float weights from `weights`."""
    nodes = []
    for node in model.graph.node:
        nodes += split_node(model, node, weights[node.name], channels[node.name]) if node.name in channels else [node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
