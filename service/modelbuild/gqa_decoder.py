"""The CPU decoder graph for Llama-family models, written the onnxruntime-genai way with ORT's fused contrib ops.

One graph serves prefill and decode (`state_update: "shared"`, docs/model-bundle.md): any number of new tokens S,
GroupQueryAttention with RoPE inside and a KV cache whose past and present are the same buffer (the kernel writes
the S new rows in place, so the runtime copies nothing per step), SkipSimplifiedLayerNormalization for each
residual add + RMSNorm, and MatMulNBits for weights transcoded from GGUF blocks (`gguf_blocks.NBitsWeight`; block
offsets such as Q4_1's mins come back as (block sums of x) @ offsets, added by the same Gemm). Logits are
computed for the last position only unless `all_logits` (evaluation graphs).

Inside, the hidden stream is 2-D [S, hidden] (in and out of GroupQueryAttention and at the graph's ends it is
[1, S, ...]): ONNX Gemm takes only 2-D operands, and one Gemm(block sums, offsets, y) is the MatMul + Add of the
block-offset correction in a single node, which made the 2-thread decode step ~4 % faster (docs/model-bundle.md).
"""
from __future__ import annotations

import numpy as np

from .decoder import DecoderSpec
from .gguf_blocks import NBitsWeight, concat_rows
from .graph import GraphBuilder

SHARED = "shared"
SEQ_AXIS = "sequence_length"
CACHE_AXIS = "cache_length"
# accuracy_level 4: MatMulNBits quantizes activations to int8 per block inside the kernel (as llama.cpp does for
# its Q4/Q8 dot products); the fast VNNI path on x86. Level 0 keeps activations float.
ACCURACY_LEVEL = 4

Weight = "np.ndarray | NBitsWeight"


def rope_caches(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's cos/sin caches [context, head_dim / 2] (rotate-half layout)."""
    half = spec.head_dim // 2
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / spec.head_dim))
    angles = np.arange(spec.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _GqaWriter:
    def __init__(self, spec: DecoderSpec, weights: dict, name: str, all_logits: bool, accuracy_level: int):
        spec.validate()
        if set(spec.layer_kinds) != {"attention"} or spec.qk_norm:
            raise ValueError(f"{spec.architecture}: the GQA CPU graph writes Llama-style attention layers only")
        self.spec, self.w, self.all_logits, self.level = spec, weights, all_logits, accuracy_level
        self.g = GraphBuilder(name)
        self._block_sums: dict[tuple[str, int], str] = {}

    # -- linears --------------------------------------------------------------------------------
    def linear(self, x: str, name: str, parts: list) -> str:
        """x @ concat(parts)^T, parts in [out, in]: one MatMul / MatMulNBits when they share a layout."""
        if all(isinstance(p, np.ndarray) for p in parts):
            weight = np.concatenate([np.asarray(p, np.float32) for p in parts]).T
            return self.g.op("MatMul", [x, self.g.init(f"{name}.weight", weight)])
        if all(isinstance(p, NBitsWeight) for p in parts) and len({p.layout() for p in parts}) == 1:
            return self.nbits(x, name, concat_rows(parts))
        outs = [self.linear(x, f"{name}.{j}", [p]) for j, p in enumerate(parts)]
        return self.g.op("Concat", outs, axis=-1)

    def nbits(self, x: str, name: str, w: NBitsWeight) -> str:
        g = self.g
        n, k = w.shape
        y = g.op("MatMulNBits", [x, g.init(f"{name}.weight", w.packed()), g.init(f"{name}.scales", w.scales)],
                 domain="com.microsoft", K=k, N=n, bits=w.bits, block_size=w.block_size, accuracy_level=self.level)
        if w.offsets is None:
            return y
        offsets = g.init(f"{name}.offsets", np.ascontiguousarray(w.offsets.T))          # [K / block, N]
        return g.op("Gemm", [self.block_sums(x, k, w.block_size), offsets, y])          # sums @ offsets + y

    def block_sums(self, x: str, k: int, block: int) -> str:
        """[S, K] -> [S, K / block]: each block's sum of x (shared by the linears that read the same x)."""
        key = (x, block)
        if key not in self._block_sums:
            blocks = self.g.op("Reshape", [x, self.g.const([-1, k // block, block], "int64")])
            self._block_sums[key] = self.g.op("ReduceSum", [blocks, self.g.const([-1], "int64")], keepdims=0)
        return self._block_sums[key]

    # -- layers ---------------------------------------------------------------------------------
    def attention(self, i: int, h: str, lw: dict) -> str:
        s, g = self.spec, self.g
        qkv = g.op("Unsqueeze", [self.linear(h, f"layers.{i}.attn.qkv", [lw["q"], lw["k"], lw["v"]]),
                                 g.const([0], "int64")])
        shape = [1, s.num_kv_heads, CACHE_AXIS, s.head_dim]
        past_k = g.input(f"past_key.{i}", "float32", shape)
        past_v = g.input(f"past_value.{i}", "float32", shape)
        ctx = g.unique("attn")
        present_k, present_v = f"present_key.{i}", f"present_value.{i}"
        g.nodes.append(_node("GroupQueryAttention",
                             [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length",
                              "rope.cos", "rope.sin"],
                             [ctx, present_k, present_v], g.unique("gqa"), num_heads=s.num_heads,
                             kv_num_heads=s.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                             scale=float(s.head_dim ** -0.5)))
        g.outputs += [_value(present_k, shape), _value(present_v, shape)]
        return self.linear(g.op("Squeeze", [ctx, g.const([0], "int64")]), f"layers.{i}.attn.o", [lw["o"]])

    def mlp(self, i: int, h: str, lw: dict) -> str:
        g, inter = self.g, self.spec.intermediate_size
        gate_up = self.linear(h, f"layers.{i}.mlp.gate_up", [lw["gate"], lw["up"]])
        gate, up = g.op("Split", [gate_up, g.const([inter, inter], "int64")], n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        return self.linear(act, f"layers.{i}.mlp.down", [lw["down"]])

    def skip_norm(self, x: str, residual: str, name: str, weight: np.ndarray) -> tuple[str, str]:
        """(RMSNorm(x + residual) * weight, x + residual) in one SkipSimplifiedLayerNormalization."""
        g = self.g
        normed, total = g.unique("norm"), g.unique("residual")
        g.nodes.append(_node("SkipSimplifiedLayerNormalization",
                             [x, residual, g.init(f"{name}.weight", np.asarray(weight, np.float32))],
                             [normed, "", "", total], g.unique("skipnorm"), epsilon=float(self.spec.rms_eps)))
        return normed, total

    def build(self) -> GraphBuilder:
        s, g = self.spec, self.g
        x = g.op("Squeeze", [g.input("inputs_embeds", "float32", [1, SEQ_AXIS, s.hidden_size]),
                             g.const([0], "int64")])
        g.input("seqlens_k", "int32", [1])
        g.input("total_sequence_length", "int32", [])
        cos, sin = rope_caches(s)
        g.init("rope.cos", cos)
        g.init("rope.sin", sin)
        layers = self.w["layers"]
        h = g.op("SimplifiedLayerNormalization", [x, g.init("layers.0.input_norm.weight",
                                                            np.asarray(layers[0]["input_norm"], np.float32))],
                 axis=-1, epsilon=float(s.rms_eps))
        residual, out = x, None          # out: the previous layer's MLP output, folded into this layer's norm
        for i, lw in enumerate(layers):
            if i:
                h, residual = self.skip_norm(out, residual, f"layers.{i}.input_norm", lw["input_norm"])
            attn = self.attention(i, h, lw)
            h, residual = self.skip_norm(attn, residual, f"layers.{i}.ffn_norm", lw["ffn_norm"])
            out = self.mlp(i, h, lw)
        h, _ = self.skip_norm(out, residual, "final_norm", self.w["norm"])
        if not self.all_logits:  # prefill needs the next token only: the head runs on one row
            h = g.op("Slice", [h, g.const([-1], "int64"), g.const([np.iinfo(np.int64).max], "int64"),
                               g.const([0], "int64")])
        head = self.w["embed"] if s.tied_head else self.w["lm_head"]
        logits = g.op("Unsqueeze", [self.linear(h, "lm_head", [head]), g.const([0], "int64")])
        g.output(logits, "logits", "float32", [1, SEQ_AXIS if self.all_logits else 1, s.vocab_size])
        by_name = {o.name: o for o in g.outputs}
        g.outputs = [by_name[e["output"]] for e in [{"output": "logits"}, *shared_state_entries(s)]]
        return g


def _node(op: str, inputs: list[str], outputs: list[str], name: str, **attrs):
    from onnx import helper
    return helper.make_node(op, inputs, outputs, name=name, domain="com.microsoft", **attrs)


def _value(name: str, shape: list):
    from onnx import TensorProto, helper
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def build_gqa_decoder(spec: DecoderSpec, weights: dict, name: str = "decoder", all_logits: bool = False,
                      accuracy_level: int = ACCURACY_LEVEL) -> GraphBuilder:
    """The shared-buffer GQA graph; layer weights are float arrays [out, in] or NBitsWeight."""
    return _GqaWriter(spec, weights, name, all_logits, accuracy_level).build()


def shared_state_entries(spec: DecoderSpec) -> list[dict]:
    L, kv, hd = spec.context_length, spec.num_kv_heads, spec.head_dim
    return [{"input": f"past_{part}.{i}", "output": f"present_{part}.{i}", "kind": f"kv_{part}", "layer": i,
             "shape": [1, kv, L, hd], "dtype": "float32", "axis": 2, "dynamic_length": True, "shared_buffer": True,
             "output_shape": [1, kv, CACHE_AXIS, hd]}
            for i in range(spec.num_layers) for part in ("key", "value")]


def shared_io_description(spec: DecoderSpec) -> dict:
    """The manifest's inputs/outputs/state for the shared-buffer graph (prefill and decode alike)."""
    state = shared_state_entries(spec)
    cache = [1, spec.num_kv_heads, CACHE_AXIS, spec.head_dim]
    inputs = [{"name": "inputs_embeds", "shape": [1, SEQ_AXIS, spec.hidden_size], "dtype": "float32"},
              {"name": "seqlens_k", "shape": [1], "dtype": "int32"},
              {"name": "total_sequence_length", "shape": [], "dtype": "int32"}]
    inputs += [{"name": e["input"], "shape": cache, "dtype": "float32"} for e in state]
    outputs = [{"name": "logits", "shape": [1, 1, spec.vocab_size], "dtype": "float32"}]
    outputs += [{"name": e["output"], "shape": cache, "dtype": "float32"} for e in state]
    return {"inputs": inputs, "outputs": outputs, "state": state, "state_update": SHARED}


def linear_graph(weight, accuracy_level: int = 0, name: str = "linear") -> GraphBuilder:
    """x [1, M, K] -> x @ weight^T, exactly as the decoder writes a layer (MatMulNBits + block-sum offsets, or a
    float MatMul): tests reconstruct the weight through ORT by feeding the identity."""
    k = weight.shape[1]
    writer = _GqaWriter.__new__(_GqaWriter)
    writer.g, writer.level, writer._block_sums = GraphBuilder(name), accuracy_level, {}
    g = writer.g
    x = g.op("Squeeze", [g.input("x", "float32", [1, "m", k]), g.const([0], "int64")])     # 2-D, as in the decoder
    g.output(g.op("Unsqueeze", [writer.linear(x, name, [weight]), g.const([0], "int64")]), "y", "float32",
             [1, "m", weight.shape[0]])
    return writer.g
