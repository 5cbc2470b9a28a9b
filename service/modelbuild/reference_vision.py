"""Numpy reference of the AutoNeural vision path (encoder + MSFA + connector), written from the
architecture description, independent of the ONNX graph code: the float graph must match it."""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from service.modelbuild.vision import VisionConfig, blocks


def _act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "hardswish":
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0
    if kind == "relu6":
        return np.clip(x, 0.0, 6.0)
    return np.maximum(x, 0.0)


def _windows(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    """[C, H, W] -> [C, Ho, Wo, k, k] views with zero padding k//2."""
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)))
    return sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1) -> np.ndarray:
    """Dense conv, x [Cin, H, W], w [Cout, Cin, k, k]."""
    k = w.shape[-1]
    if k == 1 and stride == 1:
        return np.einsum("oc,chw->ohw", w[:, :, 0, 0], x, optimize=True) + b[:, None, None]
    win = _windows(x, k, stride)
    return np.einsum("chwij,ocij->ohw", win, w, optimize=True) + b[:, None, None]


def depthwise2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    win = _windows(x, w.shape[-1], stride)
    return np.einsum("chwij,cij->chw", win, w[:, 0], optimize=True) + b[:, None, None]


def avg_pool(x: np.ndarray, factor: int) -> np.ndarray:
    c, h, w = x.shape
    return x.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype)


def vision_forward(cfg: VisionConfig, weights: dict[str, np.ndarray], pixel_values: np.ndarray) -> np.ndarray:
    """pixel_values [1, 3, S, S] -> image_embeds [1, tokens, lm_hidden] (float64 internally)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    act = cfg.activation
    x = _act(conv2d(pixel_values[0].astype(np.float64), w["stem.weight"], w["stem.bias"], 2), act)
    stage_outputs = []
    for stage in blocks(cfg):
        for blk in stage:
            h = x
            if blk.has_expand:
                h = _act(conv2d(h, w[f"{blk.prefix}.expand.weight"], w[f"{blk.prefix}.expand.bias"]), act)
            h = _act(depthwise2d(h, w[f"{blk.prefix}.dw.weight"], w[f"{blk.prefix}.dw.bias"], blk.stride), act)
            h = conv2d(h, w[f"{blk.prefix}.project.weight"], w[f"{blk.prefix}.project.bias"])
            x = x + h if blk.residual else h
        stage_outputs.append(x)
    fused = [avg_pool(stage_outputs[i], stage_outputs[i].shape[-1] // cfg.token_grid) for i in cfg.fusion_stages]
    x = np.concatenate(fused, axis=0)
    x = _act(conv2d(x, w["msfa.expand.weight"], w["msfa.expand.bias"]), act)
    x = conv2d(x, w["msfa.project.weight"], w["msfa.project.bias"])
    tokens = x.reshape(cfg.fusion_channels, cfg.num_tokens).T          # row-major grid order
    h = gelu(tokens @ w["connector.fc1.weight"] + w["connector.fc1.bias"])
    out = h @ w["connector.fc2.weight"] + w["connector.fc2.bias"]
    return out[None].astype(np.float32)
