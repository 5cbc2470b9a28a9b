"""Rotation of a decoder's residual stream, folded into its weights (the QuaRot / SpinQuant idea), so 16-bit
per-tensor activations and 8/4-bit weights stop paying for one outlier channel.

SmolLM2's residual stream holds values near 25,000 in channel 507 (first token, newlines) against a median
|x| of about 2; one 16-bit scale per tensor then has a step of ~0.4. With an orthogonal Q the model computes
x' = x Q instead of x: every channel of x' mixes all channels of x, so the outlier spreads over d channels
(~1/sqrt(d) of it each) and the float function is unchanged:
- RMSNorm weights are folded into the linears that read the normed stream (q/k/v, gate/up, LFM2's conv
  in_proj, lm_head), leaving RMSNorm(x) = x / rms(x), which commutes with Q (rms(xQ) = rms(x));
- linears reading the stream take W Q ([out, in] orientation), linears writing it Q^T W (and b Q);
- the embedding table becomes E Q, a tied head is untied (the head is (E * g) Q, the table E Q).
The rotated model needs its own embedding table (`weights["embed"]`): feed `inputs_embeds` from it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .decoder import DecoderSpec

READS_STREAM = {"attention": ("q", "k", "v"), "conv": ("in_proj",)}
WRITES_STREAM = {"attention": (("o", None),), "conv": (("out_proj", "out_proj_bias"),)}


def random_orthogonal(d: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def fold_norms(spec: DecoderSpec, weights: dict) -> tuple[DecoderSpec, dict]:
    """Move every RMSNorm weight into the linears after it (norm weights become ones); unties the head."""
    out = {k: v for k, v in weights.items() if k != "layers"}
    layers = []
    for kind, lw in zip(spec.layer_kinds, weights["layers"]):
        lw = dict(lw)
        g = np.asarray(lw["input_norm"], np.float64)
        for name in READS_STREAM[kind]:
            lw[name] = np.asarray(lw[name], np.float64) * g[None, :]
        f = np.asarray(lw["ffn_norm"], np.float64)
        for name in ("gate", "up"):
            lw[name] = np.asarray(lw[name], np.float64) * f[None, :]
        lw["input_norm"] = np.ones_like(g, np.float32)
        lw["ffn_norm"] = np.ones_like(f, np.float32)
        layers.append(lw)
    head = weights["embed"] if spec.tied_head else weights["lm_head"]
    out["lm_head"] = np.asarray(head, np.float64) * np.asarray(weights["norm"], np.float64)[None, :]
    out["norm"] = np.ones_like(np.asarray(weights["norm"]), np.float32)
    out["layers"] = layers
    return dataclasses.replace(spec, tied_head=False), out


def rotate(spec: DecoderSpec, weights: dict, q: np.ndarray) -> dict:
    """Weights of the model whose residual stream is x Q (norms must be folded first)."""
    if spec.tied_head:
        raise ValueError("rotate: fold_norms first (the head must be untied)")
    q = np.asarray(q, np.float64)
    out = {k: v for k, v in weights.items() if k != "layers"}
    out["embed"] = (np.asarray(weights["embed"], np.float64) @ q).astype(np.float32)
    out["lm_head"] = (np.asarray(weights["lm_head"], np.float64) @ q).astype(np.float32)
    layers = []
    for kind, lw in zip(spec.layer_kinds, weights["layers"]):
        lw = dict(lw)
        for name in READS_STREAM[kind] + ("gate", "up"):
            lw[name] = (np.asarray(lw[name], np.float64) @ q).astype(np.float32)
        for name, bias in WRITES_STREAM[kind] + (("down", None),):
            lw[name] = (q.T @ np.asarray(lw[name], np.float64)).astype(np.float32)
            if bias and lw.get(bias) is not None:
                lw[bias] = (np.asarray(lw[bias], np.float64) @ q).astype(np.float32)
        layers.append({k: (np.asarray(v, np.float32) if isinstance(v, np.ndarray) else v) for k, v in lw.items()})
    out["layers"] = layers
    return out


def rotate_residual(spec: DecoderSpec, weights: dict, seed: int = 0) -> tuple[DecoderSpec, dict, np.ndarray]:
    """fold_norms + rotate with a seeded random orthogonal Q; returns (spec, weights, Q)."""
    spec, folded = fold_norms(spec, weights)
    q = random_orthogonal(spec.hidden_size, seed)
    return spec, rotate(spec, folded, q), q


def residual_peak_ratio(stream: np.ndarray) -> float:
    """max |x| / median |x| of residual-stream values: what one 16-bit scale per tensor has to span."""
    a = np.abs(np.asarray(stream, np.float64))
    return float(a.max() / max(np.median(a), 1e-12))
