"""A small TF.js graph-model -> ONNX converter, for the ops the perception models use.

tf2onnx can do this, but needs TensorFlow (a ~600 MB install) in the build. A TF.js graph model is just a
GraphDef in JSON plus weight shards, so each op maps to ONNX directly through the handler table in `ops.py`.
NHWC ops are wrapped in transposes to ONNX's NCHW; ONNX Runtime's transpose optimizer cancels the
back-to-back pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

from service.perception.build.tfjs import ops  # noqa: F401  (handler modules register their ops on import)
from service.perception.build.tfjs.graph import Graph, TfjsConversionError, load_weights, ref
from service.perception.build.tfjs.ops import FOLDS, OPS

__all__ = ["TfjsConversionError", "convert", "load_weights", "prune"]


def convert(model_json_path: str | Path, out_path: str | Path, opset: int = 13) -> onnx.ModelProto:
    path = Path(model_json_path)
    model_json = json.loads(path.read_text())
    if model_json.get("format") != "graph-model":
        raise TfjsConversionError(f"{path.name}: not a TF.js graph model (format {model_json.get('format')!r})")
    tf_nodes = model_json["modelTopology"]["node"]
    consumers: dict[str, int] = {}
    for node in tf_nodes:
        for i in node.get("input", []):
            consumers[ref(i)] = consumers.get(ref(i), 0) + 1
    g = Graph(load_weights(model_json, path.parent), consumers)
    graph_inputs = []
    for node in tf_nodes:
        kind, name, ins = node["op"], node["name"], [i for i in node.get("input", []) if not i.startswith("^")]
        if kind == "Const":
            if name not in g.consts:
                raise TfjsConversionError(f"{name}: constant without weights")
        elif kind == "Placeholder":
            dims = [int(d["size"]) for d in node["attr"]["shape"]["shape"]["dim"]]
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        elif all(g.is_const(i) for i in ins):
            if kind not in FOLDS:
                raise TfjsConversionError(f"{name}: cannot fold constant op {kind}")
            g.consts[name] = FOLDS[kind](node, [g.consts[ref(i)] for i in ins])
        elif kind in OPS:
            OPS[kind](g, node, name, ref(ins[0]), ins)
        else:
            raise TfjsConversionError(f"{name}: op {kind} is not supported by this converter")

    outputs = [helper.make_tensor_value_info(o.split(":")[0], TensorProto.FLOAT,
                                             [int(d["size"]) for d in spec["tensorShape"]["dim"]])
               for o, spec in sorted(model_json["signature"]["outputs"].items())]
    nodes = prune(g.nodes, [o.name for o in outputs])
    used = {i for n in nodes for i in n.input}
    inits = [v for k, v in g.inits.items() if k in used]
    graph = helper.make_graph(nodes, path.stem, graph_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="incar-tfjs",
                              ir_version=8)   # what every ONNX Runtime we ship can load
    model = _fill_resize_channels(model)
    onnx.checker.check_model(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, str(out_path))
    return model


def prune(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
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
