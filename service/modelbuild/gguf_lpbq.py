"""W4A16 from a GGUF's own 4-bit codes: LPBQ whose integers are copied from the file, never re-rounded.

Q4_1 stores w = d*q + m per block of 32 (q in 0..15, d and m fp16), which is exactly
w = d*(q - 8) + (m + 8d): the codes q - 8 lie in [-8, 7], i.e. they are symmetric int4 codes with block
scale d on blocks of 32 along the input axis, plus one offset c = m + 8d per block (Q4_0: no offset; Q4_K:
the same per 32-weight sub-block, `gguf_blocks`). So the HTP's LPBQ (int4 blocks whose scales are integers
on a per-channel float grid) holds the codes exactly, and only two things are approximated:
- the block scales d: d_b ~ s_n * u_b with u_b an integer 1..16 per block (the HTP's 4-bit block-scale
  integers) and s_n one float per output channel, chosen to minimise the scale error weighted by each block's
  code energy; the block mean of that error moves into the offset;
- the offsets: y += (block sums of x) @ C with C [K/32, N], an ordinary int8 per-channel MatMul weight,
  as the CPU graph adds Q4_1's mins (`gqa_decoder.nbits` / `block_sums`).
`split_offsets` rewrites a float graph into that form (exact in float: W = W_sym + offsets), so onnxruntime's
quantizer calibrates the block sums like any activation; `qdq.quantize_qdq(lpbq_codes=...)` then writes the
copied codes. The rotation of the residual stream (`rotation.py`) cannot be used with copied codes: W Q is not
on any 4-bit grid.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .gguf_blocks import NBitsWeight, concat_rows
from .qdq import sqnr_db
from .weight_codec import LPBQ_SCALE_LEVELS, Lpbq, channel_scale, round_to_grid

# The HTP expands LPBQ block scales from 4-bit integers: 1..16 under the channel scale (probed on the emulator:
# integers above 16 come out wrong, -10 dB on a tiny MLP, while CPU QDQ reads them fine).
SCALE_LEVELS = LPBQ_SCALE_LEVELS
OFFSETS_SUFFIX = ".block_offsets"
RECIPE = "gguf-codes-lpbq32-a16"       # the name manifests and the bench give this W4A16 recipe
_SCALE_SEARCH = np.linspace(0.55, 1.1, 56)       # channel steps tried, as fractions of max(d) / SCALE_LEVELS


def channel_grid(d: np.ndarray, energy: np.ndarray | None = None,
                 levels: int = SCALE_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """d [nb, N] block scales (>= 0) -> (u [nb, N] uint8 in 1..levels, s [N]) with u * s ~ d. Each channel's step s
    is searched around max(d) / levels for the least sum(energy * (d - u s)^2) (a block's scale error costs
    its code energy: the error of its weights is (d - u s) * code)."""
    d = np.asarray(d, np.float64)
    energy = np.ones_like(d) if energy is None else np.asarray(energy, np.float64)
    base = np.maximum(d.max(axis=0), 1e-30) / levels
    best_s, best_err = base, None
    for f in _SCALE_SEARCH:
        s = base * f
        u = np.clip(np.rint(d / s[None]), 1, levels)
        err = (energy * (d - u * s[None]) ** 2).sum(axis=0)
        if best_err is None:
            best_s, best_err = s, err
            continue
        better = err < best_err
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    u = np.clip(np.rint(d / best_s[None]), 1, levels)
    return u.astype(np.uint8), best_s.astype(np.float32)


def exact_lpbq(w: NBitsWeight, levels: int = SCALE_LEVELS) -> tuple[Lpbq, np.ndarray | None]:
    """A 4-bit GGUF weight [N, K] -> (LPBQ in MatMul orientation [K, N] with the file's codes, offsets
    C [K/block, N] float32 or None). The block-mean of the scale error, (d - u s) * mean(code), is moved into
    the offset when there is one: exact for the block's mean, so only the zero-mean part of the error is left."""
    if w.bits != 4:
        raise ValueError(f"exact_lpbq: {w.source_type} holds {w.bits}-bit codes; LPBQ copies 4-bit codes only")
    n, k = w.shape
    nb, bs = k // w.block_size, w.block_size
    codes = (w.codes.astype(np.int32) - 8).reshape(n, nb, bs)                    # [N, nb, B] in [-8, 7]
    energy = (codes.astype(np.float64) ** 2).sum(-1).T + 1.0                      # [nb, N]
    ints, ch = channel_grid(np.abs(w.scales).T, energy, levels)
    # GGUF's Q4_1/Q4_K scales are >= 0; Q4_0's can be negative: its codes are flipped (code -8 then clips)
    sign = np.where(w.scales < 0, -1, 1)[..., None]                               # [N, nb, 1]
    q = np.clip(codes * sign, -8, 7)
    enc = Lpbq(np.ascontiguousarray(q.reshape(n, k).T, np.int32), ints, ch, bs)
    if w.offsets is None:
        return enc, None
    scale_error = w.scales.T - ints * ch[None]                                     # [nb, N]
    offsets = w.offsets.T + scale_error * codes.mean(-1).T
    return enc, np.ascontiguousarray(offsets, np.float32)


def symmetric_part(w: NBitsWeight) -> np.ndarray:
    """scales * (codes - 8) [N, K]: the weight without its block offsets."""
    return NBitsWeight(w.codes, w.scales, None, w.bits, w.block_size, w.source_type).dequantize()


def decoder_blocks(transcoded: dict) -> dict[str, NBitsWeight]:
    """`load_gguf(transcode_blocks=True).transcoded` -> graph weight name -> NBitsWeight [N, K] for the 4-bit
    layer weights of `decoder.build_decoder`'s graphs: the fused qkv and gate_up of its append mode and the
    separate projections of its replace mode (a name the graph lacks is not looked up)."""
    out = {}
    for i, lw in enumerate(transcoded["layers"]):
        parts = {f"layers.{i}.attn.qkv.weight": ("q", "k", "v"), f"layers.{i}.mlp.gate_up.weight": ("gate", "up")}
        parts |= {f"layers.{i}.attn.{k}.weight": (k,) for k in ("q", "k", "v", "o")}
        parts |= {f"layers.{i}.mlp.{k}.weight": (k,) for k in ("gate", "up", "down")}
        for name, keys in parts.items():
            ws = [lw[k] for k in keys]
            if all(isinstance(x, NBitsWeight) and x.bits == 4 for x in ws) and len({x.layout() for x in ws}) == 1:
                out[name] = ws[0] if len(ws) == 1 else concat_rows(ws)
    return out


def split_offsets(model: onnx.ModelProto, blocks: Mapping[str, NBitsWeight],
                  offsets: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Rewrite a float graph (weights loaded) so that each MatMul weight named in `blocks` holds its
    symmetric part and its block offsets are added as ReduceSum(Reshape(x)) @ C: the same function.
    `offsets`: C [K/block, N] to write instead of the file's (e.g. `exact_lpbq`'s, which carry the scale
    error's block means)."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, sums = [], {}
    for node in model.graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if name not in blocks or name not in inits:
            nodes.append(node)
            continue
        w = blocks[name]
        n, k = w.shape
        if tuple(inits[name].dims) != (k, n):
            raise ValueError(f"split_offsets: {name} is {list(inits[name].dims)} in the graph, "
                             f"the GGUF gives [{k}, {n}]")
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(symmetric_part(w).T), name))
        if w.offsets is None:
            nodes.append(node)
            continue
        base, x, y = name.removesuffix(".weight"), node.input[0], node.output[0]
        key = (x, w.block_size)
        if key not in sums:
            shape, axes = f"{base}.block_shape", f"{base}.block_axes"
            model.graph.initializer.extend([
                numpy_helper.from_array(np.array([0, 0, k // w.block_size, w.block_size], np.int64), shape),
                numpy_helper.from_array(np.array([-1], np.int64), axes)])
            nodes += [onnx.helper.make_node("Reshape", [x, shape], [f"{base}.blocks"], name=f"{base}.blocks"),
                      onnx.helper.make_node("ReduceSum", [f"{base}.blocks", axes], [f"{base}.block_sums"],
                                            name=f"{base}.block_sums", keepdims=0)]
            sums[key] = f"{base}.block_sums"
        offsets_name = base + OFFSETS_SUFFIX
        c = w.offsets.T if name not in (offsets or {}) else offsets[name]
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(c, np.float32), offsets_name))
        main = onnx.NodeProto()
        main.CopyFrom(node)
        main.output[0] = f"{base}.symmetric"
        term = f"{base}.offset_term"
        nodes += [main,
                  onnx.helper.make_node("MatMul", [sums[key], offsets_name], [term], name=f"{base}.offset_mm"),
                  onnx.helper.make_node("Add", [f"{base}.symmetric", term], [y], name=f"{base}.add_offsets")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@dataclass
class GgufW4:
    """What `quantize_qdq` writes for the 4-bit GGUF weights of one graph."""
    codes: dict[str, Lpbq]                        # weight name -> LPBQ (the file's codes, or GPTQ-refined)
    offsets: dict[str, np.ndarray]                # weight name -> C [K/block, N] float, for `split_offsets`
    offset_ints: dict[str, tuple[np.ndarray, np.ndarray]]   # offsets initializer -> (int8 C, scale [N])
    weight_db: dict[str, float]                   # weight name -> SQNR against the GGUF's exact weight
    refined: bool = False                         # codes re-chosen by GPTQ under the approximated block scales

    def recipe(self) -> str:
        return RECIPE.replace("-a16", "-gptq-a16") if self.refined else RECIPE


def encode(blocks: Mapping[str, NBitsWeight], hessians: Mapping[str, np.ndarray] | None = None) -> GgufW4:
    """Encode every weight of `blocks`: copied codes, block scales on the 16-level grid, offsets rounded to
    int8 per channel here (so the graph holds exactly the C that GPTQ saw); with `hessians` (name -> input
    second moments, `sequential.linear_hessians` on the split graph) the codes are refined by `gptq_codes`."""
    out = GgufW4({}, {}, {}, {}, refined=hessians is not None)
    for name, w in blocks.items():
        enc, c = exact_lpbq(w)
        c_q = None
        if c is not None:
            step = channel_scale(c, 8, 1)
            ints = round_to_grid(c, step, 8, 1)
            c_q = (ints * step[None]).astype(np.float32)
            out.offsets[name] = c
            out.offset_ints[name.removesuffix(".weight") + OFFSETS_SUFFIX] = (ints.astype(np.int8), step)
        if hessians is not None and name in hessians:
            enc = gptq_codes(w, enc, c_q, hessians[name])
        out.codes[name] = enc
        out.weight_db[name] = weight_error_db(w, enc, c_q)
    return out


def weight_error_db(w: NBitsWeight, enc: Lpbq, offsets_q: np.ndarray | None = None) -> float:
    """Weight-domain SQNR of the LPBQ (+ quantized offsets) against the GGUF's exact weight."""
    exact = w.dequantize().T.astype(np.float64)                                   # [K, N]
    got = enc.dequantize().astype(np.float64)
    if offsets_q is not None:
        got = got + np.repeat(offsets_q, enc.block, axis=0)
    return sqnr_db(exact, got)


def gptq_codes(w: NBitsWeight, enc: Lpbq, offsets: np.ndarray | None, hessian: np.ndarray) -> Lpbq:
    """The codes re-chosen by sequential (GPTQ) rounding under `enc`'s block scales, towards the GGUF's exact
    weight less the offsets the graph adds: copied codes leave each block's scale error (d - u s) * code in
    place, GPTQ spreads it onto the rows not yet rounded, weighted by the input second moments H [K, K]."""
    from .cnn_ptq import gptq_round

    target = w.dequantize().T                                                     # [K, N]
    if offsets is not None:
        target = target - np.repeat(offsets, enc.block, axis=0)
    scales = np.repeat(enc.block_ints.astype(np.float32) * enc.channel_scale[None], enc.block, axis=0)   # [K, N]
    q = gptq_round(target.T, hessian, scales.T, bits=4).T
    return Lpbq(np.ascontiguousarray(q, np.int32), enc.block_ints, enc.channel_scale, enc.block)
