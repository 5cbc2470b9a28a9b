"""Sequential (GPTQ) rounding of MatMul weights from a float graph's own activations.

`linear_hessians` runs the float graph on calibration feeds and accumulates, for every MatMul weight W [K, N],
the second moments H = X^T X / n of its input rows X [n, K]. `round_weights` then rounds each weight one
input row at a time (GPTQ, Frantar et al. 2022), pushing the rounding error onto the rows not yet rounded
so that X W, not W, stays close: on the int8 per-channel grid, or on the LPBQ grid (the block scales are
chosen first from the float weights, then GPTQ picks the 4-bit integers under them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import structlog

from .cnn_ptq import expose, gptq_round, quiet_session
from .weight_codec import Lpbq, channel_scale, lpbq_quantize

log = structlog.get_logger(__name__)


def linear_hessians(float_path, feeds: Sequence[Mapping[str, np.ndarray]],
                    weight_names: Sequence[str] | None = None,
                    skip: Sequence[str] = ("lm_head",)) -> dict[str, np.ndarray]:
    """Weight name -> H [K, K] (float32) for the MatMul weights of the graph (all `*.weight` but those matching
    `skip`, or those named). The head is skipped by default: it is the largest matrix (vocab x hidden), stays
    8-bit, and gains least from sequential rounding."""
    model = onnx.load(str(float_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    by_input: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].endswith(".weight"):
            if (weight_names is None or node.input[1] in weight_names) and not any(k in node.input[1] for k in skip):
                by_input.setdefault(node.input[0], []).append(node.input[1])
    if not by_input:
        return {}
    probe = str(float_path).removesuffix(".onnx") + ".hessian-probe.onnx"
    onnx.save(expose(model, list(by_input)), probe)    # beside the float graph: its external data resolves
    try:
        sess = quiet_session(probe)
        names = list(by_input)
        sums: dict[str, np.ndarray] = {}
        rows = 0
        for feed in feeds:
            values = sess.run(names, dict(feed))
            for name, value in zip(names, values):
                x = value.reshape(-1, value.shape[-1]).astype(np.float32)
                sums[name] = sums.get(name, 0) + x.T @ x
            rows += values[0].reshape(-1, values[0].shape[-1]).shape[0]
    finally:
        import os
        os.unlink(probe)
    return {w: sums[inp] / rows for inp, ws in by_input.items() for w in ws}


def round_weights(floats: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray], lpbq: set[str],
                  block: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Lpbq]]:
    """GPTQ integers for every weight with a Hessian: int8 per-channel ones as name -> (q [K, N], scale [N]),
    LPBQ ones as name -> Lpbq."""
    int8: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    blocks: dict[str, Lpbq] = {}
    for name, H in hessians.items():
        w = np.asarray(floats[name], np.float32)                     # [K, N]
        if name in lpbq:
            enc = lpbq_quantize(w, block)
            scale = (enc.block_ints.astype(np.float32) * enc.channel_scale[None])     # [K/B, N]
            per_weight = np.repeat(scale, block, axis=0).T                               # [N, K]
            enc.q = gptq_round(w.T, H, per_weight, bits=4).T
            blocks[name] = enc
        else:
            scale = channel_scale(w, 8, 1)
            int8[name] = (gptq_round(w.T, H, scale, bits=8).T, scale)
    log.info("sequential.rounded", int8=len(int8), lpbq=len(blocks))
    return int8, blocks
