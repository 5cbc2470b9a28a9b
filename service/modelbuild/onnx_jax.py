"""A float ONNX CNN graph as a jax function, so that its conv weights can be trained through it (quantization-aware
fine-tuning, `cnn_qat.py`). Covers the ops of MobileNet-family encoders (Conv incl. depthwise, Clip/ReLU6, Relu,
HardSwish, Sigmoid, element-wise arithmetic, pooling, Flatten, Gemm, MatMul); any other op raises
`UnsupportedGraph`, and the caller keeps its post-training recipe. Needs the optional `jax` package.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper


class UnsupportedGraph(ValueError):
    """The graph holds an op (or an attribute) this interpreter does not implement."""


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _same_pads(n: int, k: int, s: int, upper: bool) -> tuple[int, int]:
    total = max((-(-n // s) - 1) * s + k - n, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _conv(jnp, lax, x, w, b, at):
    kh, kw = w.shape[-2:]
    sh, sw = at.get("strides", [1, 1])
    dh, dw = at.get("dilations", [1, 1])
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        up = auto == "SAME_UPPER"
        pads = [_same_pads(x.shape[2], (kh - 1) * dh + 1, sh, up), _same_pads(x.shape[3], (kw - 1) * dw + 1, sw, up)]
    else:
        top, left, bottom, right = at.get("pads", [0, 0, 0, 0])
        pads = [(top, bottom), (left, right)]
    group = at.get("group", 1)
    # XLA's CPU convolutions are slow on these shapes (fwd+bwd, measured): depthwise as a sum of shifted
    # products is ~3.5x faster, 1x1 as a matrix product ~2x
    if group == 1 and (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and pads == [(0, 0), (0, 0)]:
        y = jnp.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
    elif group == x.shape[1] == w.shape[0] and (dh, dw) == (1, 1):
        xp = jnp.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
        ho, wo = (xp.shape[2] - kh) // sh + 1, (xp.shape[3] - kw) // sw + 1
        y = sum(xp[:, :, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw] * w[None, :, 0, i, j, None, None]
                for i in range(kh) for j in range(kw))
    else:
        y = lax.conv_general_dilated(x, w, (sh, sw), pads, rhs_dilation=(dh, dw),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=group)
    return y if b is None else y + b[None, :, None, None]


def _pool(jnp, lax, x, at, kind):
    kh, kw = at["kernel_shape"]
    sh, sw = at.get("strides", [1, 1])
    top, left, bottom, right = at.get("pads", [0, 0, 0, 0])
    pads = ((0, 0), (0, 0), (top, bottom), (left, right))
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, kh, kw), (1, 1, sh, sw), pads)
    summed = lax.reduce_window(x, 0.0, lax.add, (1, 1, kh, kw), (1, 1, sh, sw), pads)
    return summed / (kh * kw)


def graph_function(model: onnx.ModelProto, trainable: Sequence[str]) -> tuple[Callable, dict[str, np.ndarray]]:
    """`fn(weights, inputs, names) -> {name: value}`: the graph run in jax with the initializers named in
    `trainable` taken from `weights` (a dict of arrays); the others are constants. Returns fn and the
    trainable initializers' float values."""
    import jax.numpy as jnp
    from jax import lax, nn

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    trainable = set(trainable)
    unary = {"Relu": nn.relu, "Sigmoid": nn.sigmoid, "HardSwish": lambda x: x * jnp.clip(x / 6 + 0.5, 0, 1),
             "Identity": lambda x: x, "Tanh": jnp.tanh, "Neg": jnp.negative}
    binary = {"Add": jnp.add, "Sub": jnp.subtract, "Mul": jnp.multiply, "Div": jnp.divide}
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    for n in nodes:
        known = set(unary) | set(binary) | {"Conv", "Clip", "HardSigmoid", "GlobalAveragePool", "Flatten", "Gemm",
                                            "MatMul", "MaxPool", "AveragePool", "Reshape", "Transpose", "Concat"}
        if n.op_type not in known:
            raise UnsupportedGraph(f"{model.graph.name}: op {n.op_type} (node {n.name}) is not supported")

    def fn(weights: Mapping, inputs: Mapping, names: Sequence[str]) -> dict:
        env = dict(inputs)

        def get(name):
            if name == "":
                return None
            if name in trainable:
                return weights[name]
            return env[name] if name in env else consts[name]

        for n in nodes:
            at = _attrs(n)
            args = [get(i) for i in n.input]
            op = n.op_type
            if op == "Conv":
                y = _conv(jnp, lax, args[0], args[1], args[2] if len(args) > 2 else None, at)
            elif op in unary:
                y = unary[op](args[0])
            elif op in binary:
                y = binary[op](args[0], args[1])
            elif op == "Clip":
                lo, hi = (args + [None, None])[1:3]
                lo, hi = (None if v is None else float(np.asarray(v).reshape(-1)[0]) for v in (lo, hi))
                y = jnp.clip(args[0], lo, hi)
            elif op == "HardSigmoid":
                y = jnp.clip(at.get("alpha", 0.2) * args[0] + at.get("beta", 0.5), 0, 1)
            elif op == "GlobalAveragePool":
                y = jnp.mean(args[0], axis=(2, 3), keepdims=True)
            elif op == "Flatten":
                y = args[0].reshape(int(np.prod(args[0].shape[:at.get("axis", 1)])), -1)
            elif op == "Gemm":
                a = args[0].T if at.get("transA", 0) else args[0]
                bm = args[1].T if at.get("transB", 0) else args[1]
                y = at.get("alpha", 1.0) * (a @ bm) + (0 if len(args) < 3 else at.get("beta", 1.0) * args[2])
            elif op == "MatMul":
                y = jnp.matmul(args[0], args[1])
            elif op in ("MaxPool", "AveragePool"):
                y = _pool(jnp, lax, args[0], at, "max" if op == "MaxPool" else "avg")
            elif op == "Reshape":
                shape = [int(s) for s in np.asarray(args[1])]
                y = args[0].reshape([args[0].shape[i] if s == 0 else s for i, s in enumerate(shape)])
            elif op == "Transpose":
                y = jnp.transpose(args[0], at.get("perm"))
            else:  # Concat
                y = jnp.concatenate(args, axis=at["axis"])
            env[n.output[0]] = y
        return {name: env[name] for name in names}

    return fn, {name: consts[name].astype(np.float32) for name in trainable}
