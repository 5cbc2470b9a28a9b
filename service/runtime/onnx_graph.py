"""Two small lookups over an ONNX graph, shared by the run-time lowering (htp_lowering) and the build tools
(modelbuild imports the runtime, never the reverse)."""
from __future__ import annotations

import onnx


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The Python value of `node`'s attribute `name`, or `default` when it has none."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def graph_index(graph: onnx.GraphProto):
    """(initializers by name, the node producing each tensor, the nodes consuming each tensor)."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return inits, producer, consumers
