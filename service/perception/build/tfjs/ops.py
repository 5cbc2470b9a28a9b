"""TF op -> ONNX, one handler per op, looked up in `OPS`; constant sub-graphs fold through `FOLDS`.

A handler gets the shared `Graph`, the TF node, its name, its first input (already an ONNX tensor name) and
all its data inputs. To support a new op, write a handler and register it with `@op("TfOpName")`; a handler
module other than this one must be imported in `tfjs/__init__.py` so its registrations run.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.perception.build.tfjs.graph import DTYPES, NCHW_TO_NHWC, Graph, TfjsConversionError, attr, ref

Handler = Callable[[Graph, dict, str, str, list[str]], None]
OPS: dict[str, Handler] = {}
FOLDS: dict[str, Callable[[dict, list[np.ndarray]], np.ndarray]] = {}


def op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            if name in OPS:
                raise ValueError(f"tfjs: op {name} has two handlers")
            OPS[name] = fn
        return fn
    return register


# ---- constant folding (pads and shapes that TF builds at run time) -------------------------------------

def _sparse_to_dense(node: dict, vals: list[np.ndarray]) -> np.ndarray:
    idx, shape, values, default = vals
    dense = np.full(shape.astype(np.int64), default, dtype=values.dtype if values.size else default.dtype)
    if idx.size:
        dense[tuple(idx.astype(np.int64).T)] = values
    return dense


FOLDS.update({
    "SparseToDense": _sparse_to_dense,
    "Add": lambda node, vals: vals[0] + vals[1],
    "AddV2": lambda node, vals: vals[0] + vals[1],
    "Identity": lambda node, vals: vals[0],
    "Cast": lambda node, vals: vals[0].astype(DTYPES.get(attr(node, "DstT", "float32"), np.float32)),
})


# ---- ops -------------------------------------------------------------------------------------------------

@op("Pad", "PadV2")
def _pad(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    pads = g.const(ins[1]).astype(np.int64)
    inputs = [x, g.init(f"{name}/pads", np.concatenate([pads[:, 0], pads[:, 1]]))]
    if node["op"] == "PadV2":
        value = float(g.const(ins[2]).reshape(()))
        if value < -1e30:
            g.neg_inf_pads[name] = (x, pads)
        inputs.append(g.init(f"{name}/value", np.array(value, np.float32)))
    g.emit("Pad", inputs, [name], mode="constant")


@op("Transpose")
def _transpose(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    g.transposes[name] = (x, [int(p) for p in g.const(ins[1])])
    g.emit("Transpose", [x], [name], perm=g.transposes[name][1])


@op("Conv2D")
def _conv2d(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    if attr(node, "data_format", "NHWC") != "NHWC" or attr(node, "padding") != "VALID":
        raise TfjsConversionError(f"{name}: only NHWC VALID Conv2D is supported")
    w = g.const(ins[1])                     # HWIO
    strides, dil = attr(node, "strides")[1:3], attr(node, "dilations", [1, 1, 1, 1])[1:3]
    wname = g.init(f"{name}/W", w.transpose(3, 2, 0, 1))
    g.conv_of[name] = g.nchw_wrap(name, x, "Conv", [wname], strides=strides, dilations=dil,
                                  kernel_shape=list(w.shape[:2]))


@op("MaxPool")
def _max_pool(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    if attr(node, "padding") != "VALID":
        raise TfjsConversionError(f"{name}: only VALID MaxPool is supported")
    k, s = attr(node, "ksize")[1:3], attr(node, "strides")[1:3]
    src, perm = g.transposes.get(x, ("", []))
    if src in g.neg_inf_pads and perm == NCHW_TO_NHWC and not g.neg_inf_pads[src][1][:2].any():
        # NCHW -inf PadV2 -> NHWC MaxPool: use MaxPool's own padding (it ignores padded cells), so no -inf
        # constant reaches the quantizer; the skipped Pad/Transpose become dead and are pruned.
        nchw_in, pads = g.neg_inf_pads[src]
        g.emit("MaxPool", [nchw_in], [f"{name}/out_nchw"], kernel_shape=k, strides=s,
               pads=[int(pads[2, 0]), int(pads[3, 0]), int(pads[2, 1]), int(pads[3, 1])])
        g.emit("Transpose", [f"{name}/out_nchw"], [name], perm=NCHW_TO_NHWC)
        return
    g.nchw_wrap(name, x, "MaxPool", [], kernel_shape=k, strides=s)


@op("Add", "AddV2")
def _add(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    b = ref(ins[1])
    if x in g.conv_of and g.consumers.get(x) == 1 and g.is_const(b) and g.consts[b].ndim == 1:
        # Conv + per-channel bias -> Conv with bias: one op, and the quantizer treats it as a bias (int32),
        # not as an activation-side constant whose zero entries give a zero per-channel scale.
        g.conv_of[x].input.append(g.init(f"{x}/B", g.consts[b].astype(np.float32)))
        g.emit("Identity", [x], [name])
        return
    operands = [g.init(f"{name}/c{j}", g.consts[r]) if r in g.consts else r for j, r in enumerate((x, b))]
    g.emit("Add", operands, [name])


@op("LeakyRelu")
def _leaky_relu(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    g.emit("LeakyRelu", [x], [name], alpha=float(attr(node, "alpha", 0.2)))


@op("Sigmoid", "Identity")
def _unary(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    g.emit(node["op"], [x], [name])


@op("ConcatV2")
def _concat(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    g.emit("Concat", [ref(i) for i in ins[:-1]], [name], axis=int(g.const(ins[-1])))


@op("Reshape")
def _reshape(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    g.emit("Reshape", [x, g.init(f"{name}/shape", g.const(ins[1]).astype(np.int64))], [name])


@op("SplitV")
def _split(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    sizes, axis = g.const(ins[1]).astype(np.int64), int(g.const(ins[2]))
    outs = [name] + [f"{name}:{j}" for j in range(1, len(sizes))]
    g.emit("Split", [x, g.init(f"{name}/split", sizes)], outs, axis=axis)


@op("ResizeBilinear")
def _resize_bilinear(g: Graph, node: dict, name: str, x: str, ins: list[str]) -> None:
    if not attr(node, "half_pixel_centers", False) or attr(node, "align_corners", False):
        raise TfjsConversionError(f"{name}: only half-pixel-centre bilinear resize is supported")
    hw = g.const(ins[1]).astype(np.int64)
    # The channel count (0 here) is filled from shape inference once the graph is complete.
    sizes = g.init(f"{name}/sizes", np.array([1, 0, *hw], np.int64))
    g.nchw_wrap(name, x, "Resize", ["", "", sizes], mode="linear", coordinate_transformation_mode="half_pixel")
