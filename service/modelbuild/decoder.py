"""A generic decoder writer: Llama-style attention layers and LFM2 gated short-conv layers, from weights.

Weights come in a canonical dict (Hugging Face orientation, [out, in]) produced by the loaders
(`gguf_llama.py`, `lfm2.py`); this module knows nothing about file formats. The same layer code writes
both state-update modes of `docs/model-bundle.md`:
- `append` (CPU): attention over [past L ; new T] without concatenating K/V (scores are split instead,
  so nothing of size L is copied per step); KV outputs are the T new rows.
- `replace` (NPU): KV outputs are the whole cache, written with the one-hot `cache_write` blend.
GQA reshapes Q to [1, kv_heads, group*T, hd] instead of expanding K/V; masks are additive and finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .graph import GraphBuilder

# ONNX RMSNormalization arrived in opset 23. One node instead of Pow/ReduceMean/Add/Sqrt/Div matters for
# the QDQ variants: the quantizer gives each of those intermediates its own per-tensor 16-bit scale (the
# squared residual spans ~1e6), which wrecked W8A16 logits (-1.8 dB). Both the CPU EP and the QNN HTP
# (emulator, CPU fallback disabled) accept the single node.
DECODER_OPSET = 23


class _DecoderGraph(GraphBuilder):
    def model(self):
        model = super().model()
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, DECODER_OPSET)
        return model

MASK_VALUE = -1.0e4
# The graph clamps the incoming mask to this before adding it to the scores. In float nothing changes
# (exp(-1e3) is 0 in float32 like exp(-1e4)), but the QDQ scale of the masked scores is set by their
# range: at -1e4 a 16-bit step is 0.15 (logit noise in every softmax), at -1e3 it is 0.015.
MASK_CLAMP = -1.0e3
MODES = ("append", "replace")
# Append-mode (CPU) graphs take any past length P <= L, so attention costs what the sequence holds, not
# the whole context; the runtime passes a bucketed prefix of its cache. Replace-mode graphs are static.
PAST_AXIS = "past_length"
TOTAL_AXIS = "past_length_plus_tokens"


@dataclass
class DecoderSpec:
    architecture: str                 # "llama" | "lfm2"
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope_theta: float
    context_length: int
    layer_kinds: list[str]            # per layer: "attention" | "conv"
    conv_kernel: int = 3              # LFM2 `conv_L_cache`
    qk_norm: bool = False             # LFM2 normalises q and k per head before RoPE
    tied_head: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: {self.head_dim} must be even for RoPE")
        bad = sorted(set(self.layer_kinds) - {"attention", "conv"})
        if bad:
            raise ValueError(f"layer_kinds: unknown kinds {bad}")
        if self.context_length <= 0:
            raise ValueError("context_length: must be positive")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}


def rope_tables(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [L, head_dim] for the rotate-half layout (HF Llama/LFM2)."""
    half = spec.head_dim // 2
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / spec.head_dim))
    angles = np.arange(spec.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R == concat(-x2, x1): one MatMul instead of Split/Neg/Concat."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), dtype=np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def replace_feed(H: int, L: int, T: int, rows: np.ndarray, start: int, pad: int, states: dict) -> dict:
    """Graph inputs of one replace-mode step, laid out exactly as service.runtime.generator does."""
    n = T - pad
    embeds = np.zeros((1, T, H), np.float32)
    embeds[0, pad:] = rows
    positions = np.zeros((1, T), np.int64)
    positions[0, pad:] = np.arange(start, start + n)
    token_mask = np.zeros((1, T), np.float32)
    token_mask[0, pad:] = 1.0
    mask = np.full((1, 1, T, L), MASK_VALUE, np.float32)
    write = np.zeros((1, 1, L, T), np.float32)
    write[0, 0, start + np.arange(n), np.arange(pad, T)] = 1.0
    visible = np.arange(L)[None, :] <= (start + np.arange(n))[:, None]
    mask[0, 0, pad:][visible] = 0.0
    mask[0, 0, :pad, 0] = 0.0
    return {"inputs_embeds": embeds, "position_ids": positions, "token_mask": token_mask,
            "attention_mask": mask, "cache_write": write, **states}


def empty_cache_feeds(spec: DecoderSpec, table: np.ndarray, chunks, tokens: int) -> list[dict]:
    """One `replace_feed` per chunk of `tokens` token ids, each a prefill from an empty cache (what calibration
    and the HTP benches feed)."""
    states = {e["input"]: np.zeros(e["shape"], np.float32) for e in state_entries(spec, tokens, "replace")}
    return [replace_feed(spec.hidden_size, spec.context_length, tokens, table[np.asarray(ids)], 0, 0, states)
            for ids in chunks]


def state_entries(spec: DecoderSpec, tokens: int, mode: str) -> list[dict]:
    L, kv, hd = spec.context_length, spec.num_kv_heads, spec.head_dim
    entries = []
    for i, kind in enumerate(spec.layer_kinds):
        if kind == "attention":
            for part in ("key", "value"):
                # `shape` is the full cache; append-mode graphs accept any prefix of it along `axis`.
                entries.append({"input": f"past_{part}.{i}", "output": f"present_{part}.{i}", "kind": f"kv_{part}",
                                "layer": i, "shape": [1, kv, L, hd], "dtype": "float32", "axis": 2,
                                "dynamic_length": mode == "append",
                                "output_shape": [1, kv, tokens if mode == "append" else L, hd]})
        else:
            shape = [1, spec.hidden_size, spec.conv_kernel - 1]
            entries.append({"input": f"past_conv.{i}", "output": f"present_conv.{i}", "kind": "conv", "layer": i,
                            "shape": shape, "dtype": "float32", "axis": 2, "output_shape": shape})
    return entries


class _Writer:
    def __init__(self, spec: DecoderSpec, weights: dict, tokens: int, mode: str, name: str):
        spec.validate()
        if mode not in MODES:
            raise ValueError(f"state_update: {mode!r} is not one of {MODES}")
        self.spec, self.w, self.T, self.mode = spec, weights, tokens, mode
        self.g = _DecoderGraph(name)

    # -- small pieces ---------------------------------------------------------------------------
    def linear(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ W^T (+ b); W given in [out, in] and stored transposed so MatMulNBits can take it."""
        y = self.g.op("MatMul", [x, self.g.init(f"{name}.weight", np.asarray(weight, np.float32).T)])
        if bias is not None:
            y = self.g.op("Add", [y, self.g.init(f"{name}.bias", np.asarray(bias, np.float32))])
        return y

    def projections(self, x: str, prefix: str, weights: dict[str, np.ndarray], fused: str) -> list[str]:
        """Several projections of one input. `append` (CPU): one MatMul `{prefix}.{fused}` split afterwards, fewer
        and larger products. `replace` (the NPU's graphs, which are quantized): one MatMul each, so that each
        output gets its own 16-bit range; fused, V took Q and K's range, 20x its own, and the HTP's blend of it
        into the cache came out ~1 V step low (SmolLM2 W8A16, 30 layers: logits +0.9 dB on CPU QDQ, +1.1 on the
        emulator; docs/quantization-htp.md)."""
        if self.mode == "replace":
            return [self.linear(x, f"{prefix}.{name}", w) for name, w in weights.items()]
        widths = [int(w.shape[0]) for w in weights.values()]
        y = self.linear(x, f"{prefix}.{fused}", np.concatenate(list(weights.values()), axis=0))
        return list(self.g.op("Split", [y, self.g.const(widths, "int64")], n_out=len(widths), axis=-1))

    def rms_norm(self, x: str, name: str, weight: np.ndarray) -> str:
        # x / sqrt(mean(x^2) + eps) * weight over the last axis, as one node (see DECODER_OPSET).
        return self.g.op("RMSNormalization", [x, self.g.init(f"{name}.weight", np.asarray(weight, np.float32))],
                         axis=-1, epsilon=float(self.spec.rms_eps))

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.g.op("Reshape", [x, self.g.const(shape, "int64")])

    # -- layers ---------------------------------------------------------------------------------
    def attention(self, i: int, x: str, lw: dict) -> str:
        s, g, T, L = self.spec, self.g, self.T, self.spec.context_length
        nh, kv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        group = nh // kv
        q, k, v = self.projections(x, f"layers.{i}.attn", {n: lw[n] for n in ("q", "k", "v")}, fused="qkv")
        q = self.reshape(q, [1, T, nh, hd])
        k = self.reshape(k, [1, T, kv, hd])
        if s.qk_norm:
            q = self.rms_norm(q, f"layers.{i}.attn.q_norm", lw["q_norm"])
            k = self.rms_norm(k, f"layers.{i}.attn.k_norm", lw["k_norm"])
        q = g.op("Transpose", [q], perm=[0, 2, 1, 3])                     # [1, nh, T, hd]
        k = g.op("Transpose", [k], perm=[0, 2, 1, 3])                     # [1, kv, T, hd]
        v = g.op("Transpose", [self.reshape(v, [1, T, kv, hd])], perm=[0, 2, 1, 3])
        q = self.rope(q)
        k = self.rope(k)
        q = g.op("Mul", [q, g.const(np.float32(hd ** -0.5))])
        q = self.reshape(q, [1, kv, group * T, hd])                      # GQA without expanding K/V
        past_len = PAST_AXIS if self.mode == "append" else L
        past_k = g.input(f"past_key.{i}", "float32", [1, kv, past_len, hd])
        past_v = g.input(f"past_value.{i}", "float32", [1, kv, past_len, hd])
        if self.mode == "append":
            s_past = g.op("MatMul", [q, g.op("Transpose", [past_k], perm=[0, 1, 3, 2])])   # [1, kv, gT, L]
            s_new = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])         # [1, kv, gT, T]
            scores = g.op("Concat", [s_past, s_new], axis=-1)
            probs = self.masked_softmax(scores)
            p_past = g.op("Slice", [probs, g.const([0], "int64"), g.const([-T], "int64"), g.const([-1], "int64")])
            p_new = g.op("Slice", [probs, g.const([-T], "int64"), g.const([np.iinfo(np.int64).max], "int64"),
                                         g.const([-1], "int64")])
            ctx = g.op("Add", [g.op("MatMul", [p_past, past_v]), g.op("MatMul", [p_new, v])])
            g.output(k, f"present_key.{i}", "float32", [1, kv, T, hd])
            g.output(v, f"present_value.{i}", "float32", [1, kv, T, hd])
        else:
            k_all = self.blend(past_k, k)
            v_all = self.blend(past_v, v)
            scores = g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])     # [1, kv, gT, L]
            probs = self.masked_softmax(scores)
            ctx = g.op("MatMul", [probs, v_all])
            g.output(k_all, f"present_key.{i}", "float32", [1, kv, L, hd])
            g.output(v_all, f"present_value.{i}", "float32", [1, kv, L, hd])
        ctx = self.reshape(ctx, [1, nh, T, hd])
        ctx = self.reshape(g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), [1, T, nh * hd])
        return self.linear(ctx, f"layers.{i}.attn.o", lw["o"])

    def masked_softmax(self, scores: str) -> str:
        s, g = self.spec, self.g
        per_head = self.reshape(scores, [1, s.num_heads, self.T, -1])
        return self.reshape(g.op("Softmax", [g.op("Add", [per_head, self.mask])], axis=-1),
                            [1, s.num_kv_heads, (s.num_heads // s.num_kv_heads) * self.T, -1])

    def blend(self, cache: str, new: str) -> str:
        """cache*(1-rowsum(cache_write)) + cache_write @ new (see qnn-notes: no ScatterElements)."""
        g = self.g
        return g.op("Add", [g.op("Mul", [cache, self.keep]), g.op("MatMul", [self.cache_write, new])])

    def rope(self, x: str) -> str:
        g = self.g
        rotated = g.op("MatMul", [x, self.rot])
        return g.op("Add", [g.op("Mul", [x, self.cos]), g.op("Mul", [rotated, self.sin])])

    def conv(self, i: int, x: str, lw: dict) -> str:
        s, g, T, H = self.spec, self.g, self.T, self.spec.hidden_size
        K = s.conv_kernel
        bcx = self.linear(x, f"layers.{i}.conv.in_proj", lw["in_proj"], lw.get("in_proj_bias"))
        b, c, xx = g.op("Split", [bcx, g.const([H, H, H], "int64")], n_out=3, axis=-1)
        # Padding tokens contribute zeros, exactly like the zero initial state they precede.
        bx = g.op("Mul", [g.op("Mul", [b, xx]), self.token_mask3])
        bx = g.op("Transpose", [bx], perm=[0, 2, 1])                                        # [1, H, T]
        past = g.input(f"past_conv.{i}", "float32", [1, H, K - 1])
        window = g.op("Concat", [past, bx], axis=-1)                                       # [1, H, K-1+T]
        kernel = g.init(f"layers.{i}.conv.weight", np.asarray(lw["conv"], np.float32).reshape(H, 1, K))
        conv_in = [window, kernel]
        if lw.get("conv_bias") is not None:
            conv_in.append(g.init(f"layers.{i}.conv.bias", np.asarray(lw["conv_bias"], np.float32)))
        conv_out = g.op("Conv", conv_in, group=H, kernel_shape=[K])                       # [1, H, T]
        present = g.op("Slice", [window, g.const([T], "int64"), g.const([T + K - 1], "int64"),
                                 g.const([2], "int64")])
        g.output(present, f"present_conv.{i}", "float32", [1, H, K - 1])
        y = g.op("Mul", [c, g.op("Transpose", [conv_out], perm=[0, 2, 1])])
        return self.linear(y, f"layers.{i}.conv.out_proj", lw["out_proj"], lw.get("out_proj_bias"))

    def mlp(self, i: int, x: str, lw: dict) -> str:
        g = self.g
        gate, up = self.projections(x, f"layers.{i}.mlp", {n: lw[n] for n in ("gate", "up")}, fused="gate_up")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        return self.linear(g.op("Mul", [act, up]), f"layers.{i}.mlp.down", lw["down"])

    # -- whole graph ----------------------------------------------------------------------------
    def build(self) -> GraphBuilder:
        s, g, T, L = self.spec, self.g, self.T, self.spec.context_length
        x = g.input("inputs_embeds", "float32", [1, T, s.hidden_size])
        pos = g.input("position_ids", "int64", [1, T])
        token_mask = g.input("token_mask", "float32", [1, T])
        width = TOTAL_AXIS if self.mode == "append" else L
        self.mask = g.op("Max", [g.input("attention_mask", "float32", [1, 1, T, width]),
                                 g.const(np.float32(MASK_CLAMP))])
        self.token_mask3 = g.op("Unsqueeze", [token_mask, g.const([2], "int64")])
        if self.mode == "replace":
            self.cache_write = g.input("cache_write", "float32", [1, 1, L, T])
            written = g.op("ReduceSum", [self.cache_write, g.const([-1], "int64")], keepdims=1)  # [1,1,L,1]
            self.keep = g.op("Sub", [g.const(np.float32(1.0)), written])
        if "attention" in s.layer_kinds:
            cos, sin = rope_tables(s)
            pos_flat = self.reshape(pos, [T])
            self.cos = self.reshape(g.op("Gather", [g.init("rope.cos", cos), pos_flat], axis=0), [1, 1, T, s.head_dim])
            self.sin = self.reshape(g.op("Gather", [g.init("rope.sin", sin), pos_flat], axis=0), [1, 1, T, s.head_dim])
            self.rot = g.init("rope.rotate_half", rotate_half_matrix(s.head_dim))
        for i, kind in enumerate(s.layer_kinds):
            lw = self.w["layers"][i]
            h = self.rms_norm(x, f"layers.{i}.input_norm", lw["input_norm"])
            h = self.attention(i, h, lw) if kind == "attention" else self.conv(i, h, lw)
            x = g.op("Add", [x, h])
            h = self.mlp(i, self.rms_norm(x, f"layers.{i}.ffn_norm", lw["ffn_norm"]), lw)
            x = g.op("Add", [x, h])
        x = self.rms_norm(x, "final_norm", self.w["norm"])
        head = self.w["embed"] if s.tied_head else self.w["lm_head"]
        logits = self.linear(x, "lm_head", head)
        g.output(logits, "logits", "float32", [1, T, s.vocab_size])
        # Outputs in manifest order: logits, then the states in layer order.
        order = ["logits"] + [e["output"] for e in state_entries(s, T, self.mode)]
        by_name = {o.name: o for o in g.outputs}
        g.outputs = [by_name[n] for n in order]
        return g


def build_decoder(spec: DecoderSpec, weights: dict, tokens: int, mode: str, name: str = "decoder") -> GraphBuilder:
    """Write one decoder graph of `tokens` tokens in state-update `mode` (`append` | `replace`)."""
    return _Writer(spec, weights, tokens, mode, name).build()


def io_description(spec: DecoderSpec, tokens: int, mode: str) -> dict:
    """The manifest's inputs/outputs/state for one decoder graph."""
    L, T = spec.context_length, tokens
    inputs = [
        {"name": "inputs_embeds", "shape": [1, T, spec.hidden_size], "dtype": "float32"},
        {"name": "position_ids", "shape": [1, T], "dtype": "int64"},
        {"name": "token_mask", "shape": [1, T], "dtype": "float32"},
        {"name": "attention_mask", "shape": [1, 1, T, f"{PAST_AXIS}+{T}" if mode == "append" else L],
         "dtype": "float32"},
    ]
    if mode == "replace":
        inputs.append({"name": "cache_write", "shape": [1, 1, L, T], "dtype": "float32"})
    state = state_entries(spec, T, mode)
    inputs += [{"name": e["input"], "dtype": "float32",
                "shape": [1, e["shape"][1], PAST_AXIS, e["shape"][3]] if e.get("dynamic_length") else e["shape"]}
               for e in state]
    outputs = [{"name": "logits", "shape": [1, T, spec.vocab_size], "dtype": "float32"}]
    outputs += [{"name": e["output"], "shape": e["output_shape"], "dtype": "float32"} for e in state]
    return {"inputs": inputs, "outputs": outputs, "state": state, "state_update": mode}
