"""Reading a TF.js graph model (GraphDef JSON + weight shards), and the state one conversion builds up."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

DTYPES = {"float32": np.float32, "int32": np.int32, "int64": np.int64, "float16": np.float16, "uint8": np.uint8}
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
                stored = DTYPES[w["dtype"]]
            arr = np.frombuffer(blob, stored, count, offset).reshape(shape)
            out[w["name"]] = arr.astype(DTYPES[w["dtype"]])
            offset += count * np.dtype(stored).itemsize
        if offset != len(blob):
            raise TfjsConversionError(f"weights: manifest covers {offset} bytes, shards hold {len(blob)}")
    return out


def attr(node: dict, key: str, default=None):
    """A TF node attribute as a Python value (string, int list, int, float or bool)."""
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


def ref(name: str) -> str:
    """A TF input reference (`node`, `node:0`, `node:1`, `^ctrl`) as the ONNX tensor name we give it."""
    name = name.lstrip("^")
    base, _, idx = name.partition(":")
    return base if idx in ("", "0") else f"{base}:{idx}"


class Graph:
    """What the op handlers share: constants (folded as we go), emitted ONNX nodes and initializers, and the
    few facts a later node needs about an earlier one (to fuse a Conv bias, or a -inf pad into a MaxPool)."""

    def __init__(self, consts: dict[str, np.ndarray], consumers: dict[str, int]):
        self.consts = consts
        self.consumers = consumers
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.conv_of: dict[str, onnx.NodeProto] = {}              # TF Conv2D name -> its ONNX Conv
        self.neg_inf_pads: dict[str, tuple[str, np.ndarray]] = {}  # PadV2 with -inf (max-pool padding): input, pads
        self.transposes: dict[str, tuple[str, list[int]]] = {}     # TF Transpose name -> (input, perm)

    def const(self, name: str) -> np.ndarray:
        key = ref(name)
        if key not in self.consts:
            raise TfjsConversionError(f"expected a constant for {name}")
        return self.consts[key]

    def is_const(self, name: str) -> bool:
        return ref(name) in self.consts

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def emit(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
        node = helper.make_node(op, inputs, outputs, name=f"{outputs[0]}/{op}", **attrs)
        self.nodes.append(node)
        return node

    def nchw_wrap(self, name: str, x: str, op: str, inputs: list[str], **attrs) -> onnx.NodeProto:
        """NHWC in, NHWC out, `op` itself in NCHW; `inputs` follow the NCHW activation."""
        self.emit("Transpose", [x], [f"{name}/nchw"], perm=NHWC_TO_NCHW)
        node = self.emit(op, [f"{name}/nchw", *inputs], [f"{name}/out_nchw"], **attrs)
        self.emit("Transpose", [f"{name}/out_nchw"], [name], perm=NCHW_TO_NHWC)
        return node
