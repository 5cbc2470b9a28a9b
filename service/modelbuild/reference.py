"""Numpy references of the decoder architectures (full-sequence recomputation, no cache).

Written from the Hugging Face definitions (LlamaForCausalLM, Lfm2ForCausalLM), independently of the
ONNX writer, so a graph that matches them is right rather than merely self-consistent.
"""
from __future__ import annotations

import numpy as np

from .decoder import DecoderSpec


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x: np.ndarray, positions: np.ndarray, spec: DecoderSpec) -> np.ndarray:
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    cos, sin = np.cos(ang)[None], np.sin(ang)[None]          # [1, N, hd] against x [heads, N, hd]
    return x * cos + _rotate_half(x) * sin


def _attention(x: np.ndarray, lw: dict, spec: DecoderSpec) -> np.ndarray:
    n = x.shape[0]
    nh, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    q = (x @ lw["q"].T).reshape(n, nh, hd)
    k = (x @ lw["k"].T).reshape(n, kv, hd)
    v = (x @ lw["v"].T).reshape(n, kv, hd).transpose(1, 0, 2)
    if spec.qk_norm:
        q = _rms(q, lw["q_norm"], spec.rms_eps)
        k = _rms(k, lw["k_norm"], spec.rms_eps)
    pos = np.arange(n)
    q = _rope(q.transpose(1, 0, 2), pos, spec)
    k = _rope(k.transpose(1, 0, 2), pos, spec)
    rep = nh // kv
    k = np.repeat(k, rep, axis=0)
    v = np.repeat(v, rep, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    scores = scores + np.triu(np.full((n, n), -np.inf), 1)[None]
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(1, 0, 2).reshape(n, nh * hd)
    return ctx @ lw["o"].T


def _short_conv(x: np.ndarray, lw: dict, spec: DecoderSpec) -> np.ndarray:
    n, H = x.shape
    bcx = x @ lw["in_proj"].T
    if lw.get("in_proj_bias") is not None:
        bcx = bcx + lw["in_proj_bias"]
    b, c, xx = bcx[:, :H], bcx[:, H:2 * H], bcx[:, 2 * H:]
    bx = b * xx
    K = spec.conv_kernel
    padded = np.concatenate([np.zeros((K - 1, H), bx.dtype), bx], axis=0)
    w = lw["conv"].reshape(H, K)                                 # causal depthwise conv1d
    out = np.stack([(padded[t:t + K] * w.T).sum(0) for t in range(n)])
    if lw.get("conv_bias") is not None:
        out = out + lw["conv_bias"]
    y = (c * out) @ lw["out_proj"].T
    if lw.get("out_proj_bias") is not None:
        y = y + lw["out_proj_bias"]
    return y


def forward(spec: DecoderSpec, weights: dict, embeds: np.ndarray) -> np.ndarray:
    """Logits [N, vocab] of a whole sequence of input embeddings [N, hidden] (float64 inside)."""
    x = np.asarray(embeds, np.float64)
    for i, kind in enumerate(spec.layer_kinds):
        lw = {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v)
              for k, v in weights["layers"][i].items()}
        h = _rms(x, lw["input_norm"], spec.rms_eps)
        x = x + (_attention(h, lw, spec) if kind == "attention" else _short_conv(h, lw, spec))
        h = _rms(x, lw["ffn_norm"], spec.rms_eps)
        gate, up = h @ lw["gate"].T, h @ lw["up"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ lw["down"].T
    x = _rms(x, np.asarray(weights["norm"], np.float64), spec.rms_eps)
    head = weights["embed"] if spec.tied_head else weights["lm_head"]
    return x @ np.asarray(head, np.float64).T
