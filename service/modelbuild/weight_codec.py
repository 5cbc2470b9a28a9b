"""Weight encodings of the QDQ graphs for the QNN HTP, written after onnxruntime's quantizer has placed the
QuantizeLinear/DequantizeLinear pairs (it only knows per-tensor and per-channel grids and its own rounding):

- `set_weight`: replace a weight's integers (and scale) with ours, e.g. sequentially rounded ones; the
  int32 bias behind the same node is re-encoded when the weight scale changes (bias scale = s_in * s_w).
- `to_lpbq`: low-power block quantization (Qualcomm's LPBQ): 4-bit blocks along the input axis whose
  float scales are a per-channel float scale times a 4-bit integer, i.e. every weight sits on an 8-bit
  per-channel grid. Written as the pattern the QNN EP fuses into BLOCKWISE_EXPANSION:
  DQ(uint8 block ints, per-channel scale, axis=1) -> block scales -> DQ(int4 weight, block_size) -> MatMul.
  The CPU EP runs the same two DQ nodes exactly, so CPU-QDQ figures are what the HTP computes.
- `weight_encodings`: what every Conv/MatMul/Gemm weight of a QDQ graph really is (dtype, scale shape,
  axis, block size): the check that per-channel never silently turns per-tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from service.runtime.onnx_graph import attribute, graph_index

WEIGHT_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")
LPBQ_SCALE_LEVELS = 16            # 4-bit block-scale integers 1..16 (the "decompressed" grid is 4+4 = 8 bits)
_INT_TYPES = {8: onnx.TensorProto.INT8, 16: onnx.TensorProto.INT16, 4: onnx.TensorProto.INT4}


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def channel_scale(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Symmetric per-channel scale absmax / qmax along `axis`, as onnxruntime's quantizer computes it."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=other).astype(np.float32)
    return np.where(absmax > 0, absmax / np.float32(qmax(bits)), np.float32(1.0)).astype(np.float32)


def _bshape(w: np.ndarray, axis: int) -> list[int]:
    shape = [1] * w.ndim
    shape[axis] = w.shape[axis]
    return shape


def round_to_grid(w: np.ndarray, scale: np.ndarray, bits: int, axis: int) -> np.ndarray:
    s = scale.reshape(_bshape(w, axis))
    return np.clip(np.rint(w / s), -qmax(bits), qmax(bits)).astype(np.int32)


# --------------------------------------------------------------------------------------------- LPBQ
@dataclass
class Lpbq:
    q: np.ndarray            # [K, N] int in [-8, 7]
    block_ints: np.ndarray   # [K/B, N] uint8 in 1..16
    channel_scale: np.ndarray  # [N] float32
    block: int

    def dequantize(self) -> np.ndarray:
        scales = self.block_ints.astype(np.float32) * self.channel_scale[None]
        return self.q.astype(np.float32) * np.repeat(scales, self.block, axis=0)


def lpbq_quantize(w: np.ndarray, block: int = 64, mse_search: bool = True) -> Lpbq:
    """w [K, N] (MatMul orientation) -> LPBQ with blocks of `block` rows. Each block's integer scale is the
    one of a few candidates (its absmax grid and smaller ones) with the least squared error: clipping a
    block's extreme value a little usually buys a finer step for the other 63 weights."""
    k_dim, n = w.shape
    if k_dim % block:
        raise ValueError(f"lpbq: K={k_dim} is not a multiple of the block size {block}")
    blocks = w.reshape(k_dim // block, block, n).astype(np.float32)
    absmax = np.abs(blocks).max(axis=1)                                    # [nb, N]
    ch = np.maximum(absmax.max(axis=0), 1e-12) / np.float32(7 * LPBQ_SCALE_LEVELS)
    base = np.clip(np.ceil(absmax / (7 * ch[None])), 1, LPBQ_SCALE_LEVELS)
    best_k, best_err = base.copy(), None
    candidates = [base] + ([np.clip(np.ceil(base * f), 1, LPBQ_SCALE_LEVELS) for f in (0.9, 0.8, 0.7)]
                           if mse_search else [])
    for k in candidates:
        s = (k * ch[None])[:, None, :]
        err = ((np.clip(np.rint(blocks / s), -8, 7) * s - blocks) ** 2).sum(axis=1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_k, best_err = np.where(better, k, best_k), np.where(better, err, best_err)
    s = (best_k * ch[None])[:, None, :]
    q = np.clip(np.rint(blocks / s), -8, 7).astype(np.int32).reshape(k_dim, n)
    return Lpbq(q, best_k.astype(np.uint8), ch.astype(np.float32), block)


# ------------------------------------------------------------------------------------ graph rewrites
def weight_dequantizers(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Float weight name (as in the float graph) -> (its DequantizeLinear, the Conv/MatMul/Gemm using it)."""
    inits, producer, _ = graph_index(model.graph)
    out = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        out[dq.input[0].removesuffix("_quantized")] = (dq, node)
    return out


def _replace_init(model: onnx.ModelProto, name: str, array: np.ndarray, data_type: int | None = None) -> None:
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    if data_type is not None and data_type == onnx.TensorProto.INT4:
        tensor = onnx.helper.make_tensor(name, data_type, array.shape, array.astype(np.int8).ravel().tolist())
    else:
        tensor = numpy_helper.from_array(array, name)
    if name in inits:
        model.graph.initializer[inits[name]].CopyFrom(tensor)
    else:
        model.graph.initializer.append(tensor)


# The largest |int32 bias| written: 1/128 below int32's limit, room for the exact-scale step's moves (< 2^-12) and
# the HTP truncation compensation (a few hundred units) that re-encode or add to it later.
BIAS_LIMIT = float(2 ** 31 - 2 ** 24)


def rescaled_integers(q: np.ndarray, axis: int | None, ratio: np.ndarray, bits: int) -> np.ndarray:
    """`q`'s integers for a coarser scale: each channel along `axis` (None: `q` is one per-tensor channel)
    whose `ratio` (old scale / new) is not 1 is multiplied by it, rounded and clipped to the symmetric `bits`
    range; the others stay as they are. Returned as float64."""
    moved = np.moveaxis(q, axis, 0).astype(np.float64) if axis is not None else q.astype(np.float64)[None]
    ratio = np.asarray(ratio, np.float64).ravel()
    change = ratio != 1
    top = qmax(bits)
    moved[change] = np.clip(np.rint(moved[change] * ratio[change].reshape(-1, *[1] * (moved.ndim - 1))), -top, top)
    return np.moveaxis(moved, 0, axis) if axis is not None else moved[0]


def set_weight(model: onnx.ModelProto, weight: str, q: np.ndarray, scale: np.ndarray) -> None:
    """Give `weight` (quantized per-channel by onnxruntime) our integers and scale; keep its bias exact.

    The int32 bias's scale must be the input scale x the weight scale, so a near-dead channel (tiny weights,
    a real bias: batch-norm folded onto an almost unused filter) would need a bias beyond int32. onnxruntime's
    quantizer raises such a channel's weight scale until the bias fits; our scales must too, or the channel
    loses its output (PP-OCR's detector with the CNN recipe's integers: 9.6 dB where 33.7 with onnxruntime's).
    That channel's integers are re-rounded on the coarser grid."""
    dq, node = weight_dequantizers(model)[weight]
    inits, producer, _ = graph_index(model.graph)
    old = inits[dq.input[0]]
    dtype = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16}.get(old.data_type)
    if dtype is None:
        raise ValueError(f"set_weight: {weight} is stored as ONNX type {old.data_type}, expected int8/int16")
    old_scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    scale = scale.astype(np.float32).reshape(old_scale.shape)
    biased = node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in producer
    if biased:
        bias_dq = producer[node.input[2]]
        bias_scale = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(inits[bias_dq.input[0]]).astype(np.float64) * bias_scale
        input_scale = np.divide(bias_scale, old_scale, out=np.zeros_like(bias_scale), where=old_scale > 0)
        needed = np.divide(np.abs(bias), input_scale * BIAS_LIMIT, out=np.zeros_like(bias), where=input_scale > 0)
        low = (scale > 0) & (scale < needed)
        if low.any() and scale.ndim == 1:
            ratio = np.divide(scale, needed, out=np.ones(scale.shape, np.float64), where=low)
            q = rescaled_integers(q, attribute(dq, "axis", 1) % q.ndim, ratio, 8 * np.dtype(dtype).itemsize)
            scale = scale.copy()
            scale[low] = (needed[low] * (1 + 2 ** -20)).astype(np.float32)   # float32 rounds either way
    _replace_init(model, dq.input[0], q.astype(dtype))
    _replace_init(model, dq.input[1], scale)
    if biased:
        ratio = np.divide(scale.astype(np.float64), old_scale.astype(np.float64),
                          out=np.ones(scale.shape, np.float64), where=old_scale > 0)
        new_scale = bias_scale * ratio
        ints = np.rint(np.divide(bias, new_scale, out=np.zeros_like(bias), where=new_scale > 0))  # dead: 0
        limit = np.iinfo(np.int32)      # a per-tensor weight's bias can still overflow: held at the limit
        _replace_init(model, bias_dq.input[0], np.clip(ints, limit.min, limit.max).astype(np.int32))
        _replace_init(model, bias_dq.input[1], new_scale.astype(np.float32))


def to_lpbq(model: onnx.ModelProto, weight: str, w: np.ndarray, block: int = 64, enc: Lpbq | None = None) -> Lpbq:
    """Re-encode MatMul weight `weight` (float values `w` [K, N]) as LPBQ in place (`enc`: integers already
    chosen, e.g. rounded sequentially); returns the encoding."""
    dq, node = weight_dequantizers(model)[weight]
    if node.op_type != "MatMul":
        raise ValueError(f"to_lpbq: {weight} feeds a {node.op_type}; LPBQ is written for MatMul weights")
    enc = enc or lpbq_quantize(w, block)
    nb, n = enc.block_ints.shape
    base = weight.replace("/", "_")
    names = {k: f"{base}_lpbq_{k}" for k in ("q", "zp", "ints", "ints_zp", "chscale")}
    _replace_init(model, names["q"], enc.q, onnx.TensorProto.INT4)
    _replace_init(model, names["zp"], np.zeros((nb, n), np.int8), onnx.TensorProto.INT4)
    _replace_init(model, names["ints"], enc.block_ints)
    _replace_init(model, names["ints_zp"], np.zeros(n, np.uint8))
    _replace_init(model, names["chscale"], enc.channel_scale)
    block_scales = f"{base}_lpbq_block_scales"
    scale_dq = onnx.helper.make_node("DequantizeLinear", [names["ints"], names["chscale"], names["ints_zp"]],
                                     [block_scales], name=f"{base}_lpbq_scale_dq", axis=1)
    new_dq = onnx.helper.make_node("DequantizeLinear", [names["q"], block_scales, names["zp"]], [dq.output[0]],
                                   name=dq.name, axis=0, block_size=block)
    nodes = list(model.graph.node)
    at = nodes.index(dq)
    nodes[at:at + 1] = [scale_dq, new_dq]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # drop the per-channel int4 tensors this replaced, by index: re-adding every initializer would copy
    # the whole model's weights once per rewritten layer
    used = {i for nd in model.graph.node for i in nd.input}
    stale = [i for i, t in enumerate(model.graph.initializer) if t.name in set(dq.input) and t.name not in used]
    for i in reversed(stale):
        del model.graph.initializer[i]
    return enc


# ----------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class WeightEncoding:
    weight: str
    op: str
    node: str
    dtype: str
    channels: int            # output channels of the weight
    scale_shape: tuple[int, ...]
    axis: int | None
    block_size: int | None

    @property
    def per_channel(self) -> bool:
        """One scale (or one scale per block) for every output channel, never one for the whole tensor."""
        return int(np.prod(self.scale_shape or (1,))) >= self.channels > 1 or self.channels == 1


def weight_encodings(model: onnx.ModelProto) -> list[WeightEncoding]:
    """Every Conv/MatMul/Gemm weight of a QDQ graph with its encoding; weights that reach the node
    without a DequantizeLinear show up as dtype 'float' (the HTP would refuse them)."""
    inits, producer, _ = graph_index(model.graph)
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        dq = producer.get(name)
        if name in inits:             # a float initializer straight into the op
            t = inits[name]
            out.append(WeightEncoding(name, node.op_type, node.name, "float", _channels(node, list(t.dims)),
                                      (), None, None))
            continue
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue                  # an activation x activation MatMul (attention scores): not a weight
        q = inits[dq.input[0]]
        scale_src = dq.input[1]
        if scale_src in inits:
            scale_shape = tuple(inits[scale_src].dims)
        else:                         # LPBQ: the block scales come from their own DequantizeLinear
            ints = inits[producer[scale_src].input[0]]
            scale_shape = tuple(ints.dims)
        out.append(WeightEncoding(dq.input[0].removesuffix("_quantized"), node.op_type, node.name,
                                  onnx.helper.tensor_dtype_to_np_dtype(q.data_type).name,
                                  _channels(node, list(q.dims)), scale_shape, attribute(dq, "axis"),
                                  attribute(dq, "block_size")))
    return out


def _channels(node: onnx.NodeProto, dims: list[int]) -> int:
    if node.op_type == "MatMul":
        return dims[-1]
    if node.op_type == "Gemm":
        return dims[0] if attribute(node, "transB", 0) else dims[1]
    if node.op_type == "ConvTranspose":
        return dims[1] * attribute(node, "group", 1)
    return dims[0]
