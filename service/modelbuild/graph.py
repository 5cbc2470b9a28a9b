"""A small builder for ONNX graphs written directly from weights (the onnxruntime-genai way).

Names are made unique by the builder, so layer code can say `g.op("MatMul", [x, w])` and chain results.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21

_NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("uint8"): TensorProto.UINT8,
    np.dtype("int8"): TensorProto.INT8,
    np.dtype("bool"): TensorProto.BOOL,
}


def onnx_dtype(dtype: str | np.dtype) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = itertools.count()
        self._consts: dict[tuple, str] = {}

    def unique(self, base: str) -> str:
        return f"{base}_{next(self._counter)}"

    def input(self, name: str, dtype: str | np.dtype, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def output(self, value: str, name: str, dtype: str | np.dtype, shape: Sequence[int | str]) -> str:
        """Expose `value` as graph output `name` (through an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self.unique("out")))
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        """Add a weight; `name` is kept as given so quantizers and reports can refer to it."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype: str = "float32") -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.unique("const"), arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        base = name or op_type.lower()
        outs = [self.unique(base) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.unique(base), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                         helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="incar-modelbuild")
        model.ir_version = 10
        return model

    def save(self, path: str | Path, external_data: str | None = None) -> Path:
        """Write the model; weights go to `external_data` (a file name beside it) when given."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = self.model()
        if external_data:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external_data, size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
        return path
