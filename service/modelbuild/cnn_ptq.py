"""Post-training W8A16 quantization of a float CNN graph for the QNN HTP (EfficientNet-Lite0, the AutoNeural
encoder): per-channel int8 weights, cross-layer equalization where it is exact, sequential (GPTQ-style)
rounding, empirical bias correction, and mixed precision by weight splitting, then 16-bit activation ranges
from many real crops (`qdq.quantize_qdq`).

Why each step (measured on EfficientNet-Lite0, docs/quantization.md):
- per-channel: after batch-norm folding the channel ranges of a layer differ by 100x; one scale per tensor
  leaves the small channels with a handful of levels (4 dB -> 18 dB).
- equalization (Nagel et al. 2019): rescales channel pairs conv_a -> conv_b so both have balanced ranges;
  exact only through ReLU or nothing, so ReLU6/HardSwish pairs are left alone (they would change the float
  function).
- sequential rounding: rounds one input column at a time and pushes its error onto the columns not yet
  rounded, weighted by the layer's input second moments (GPTQ, Frantar et al. 2022), so the layer's output,
  not its weights, is what stays close. By default against the input the layer gets in the network whose
  earlier convs are already rounded, cancelling the part of their error that is linear in it (cnn_sequential).
- bias correction: the rounding error has a non-zero mean per output channel (sum of dW times the input mean);
  it is folded into the bias.
- splitting: the HTP refuses 16-bit weights (emulator: 'Unsupported nodes' for W16A16 Conv and MatMul), so a
  layer that amplifies error is written as two int8 convs, W = s1*q1 + s2*q2 (q2 rounds the residual of q1 on
  a ~254x finer grid, ~15 effective bits), summed by one Add. Layers are chosen by their measured share of
  output noise per byte, within `split_budget` of the weight bytes; 3x3 and depthwise convs too
  (`CnnRecipe.split_spatial`): the HTP computes them as the CPU does once its requantization multipliers are
  exact (htp_requant).
- quantization-aware fine-tuning (optional, `CnnRecipe.qat`, needs jax): cnn_qat.py.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import structlog
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from . import htp_requant, htp_truncation, qdq, split_conv
from .weight_codec import _replace_init, channel_scale, round_to_grid
from service.runtime.onnx_graph import attribute

log = structlog.get_logger(__name__)
MAX_POSITIONS = 4096        # output positions per input used for a conv's second moments


@dataclass
class CnnRecipe:
    equalize: bool = True
    sequential_rounding: bool = True
    bias_correction: bool = True
    split_budget: float = 0.15            # fraction of weight bytes allowed above 8 bits
    target_weight_sqnr_db: float = 48.0   # stop splitting once the predicted weight-only SQNR reaches this
    # Split 3x3/depthwise convs too: with exact requantization scales (htp_requant) the HTP emulator computes
    # them as CPU QDQ does (EfficientNet-Lite0 at 224: CPU 32.33 dB, HTP 32.01; 1x1 splits only: 31.14 / 31.18).
    # Before that fix they were ~39 dB away from CPU QDQ. False: 1x1 convs only.
    split_spatial: bool = True
    stat_samples: int = 32                # calibration inputs for second moments and means
    min_rounding_samples: int = 32        # fewer inputs than this: round to nearest (GPTQ over-fits 8 crops)
    sensitivity_samples: int = 8          # spread over the calibration set (`spread`)
    damp: float = 0.01
    # round each conv against its input in the network whose earlier convs are already rounded, cancelling
    # the incoming error that is linear in that input (cnn_sequential; EfficientNet-Lite0 weights only
    # +1.1 dB); its least-squares correction is damped by `compensation_damp` x the mean input energy
    quantized_inputs: bool = True
    compensation_damp: float = 1.0
    qat: object | None = None             # a cnn_qat.QatRecipe: fine-tune the rounded weights (needs jax)
    htp_calibration_inputs: int = 2       # fit the HTP truncation compensation on these (htp_truncation); 0: not


@dataclass
class CnnReport:
    equalized_pairs: int = 0
    rounded: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    bytes_above_8bit_pct: float = 0.0
    predicted_weight_sqnr_db: float = 0.0
    layer_noise_db: dict[str, float] = field(default_factory=dict)
    qat: dict = field(default_factory=dict)          # cnn_qat.QatReport.to_dict(), when that step ran
    rounding: str = "nearest"                        # "gptq", or "gptq-quantized-inputs" (cnn_sequential)
    htp_truncation: dict = field(default_factory=dict)  # htp_truncation.calibrate_file's result, when it ran

    def to_dict(self) -> dict:
        return {"equalized_pairs": self.equalized_pairs, "rounding": self.rounding, "rounded_layers": len(self.rounded),
                "split_layers": self.split, "bytes_above_8bit_pct": round(self.bytes_above_8bit_pct, 2),
                "predicted_weight_sqnr_db": round(float(self.predicted_weight_sqnr_db), 2), **self.qat,
                **({"htp_truncation_units": self.htp_truncation["units"]} if self.htp_truncation else {})}


def _convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Make intermediate tensors `names` graph outputs too (in place), so one run returns them."""
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return model


def quiet_session(model_or_path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_or_path, so, providers=["CPUExecutionProvider"])


def run_with(model: onnx.ModelProto, feeds: Sequence[Mapping], names: Sequence[str]):
    """Yield, per feed, the float values of `names` (intermediate tensors exposed as outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    sess = quiet_session(expose(m, names).SerializeToString())
    for feed in feeds:
        yield dict(zip(names, sess.run(list(names), dict(feed))))


def _same_pads(n: int, k: int, s: int, auto: str) -> tuple[int, int]:
    total = max((-(-n // s) - 1) * s + k - n, 0)
    small = total // 2
    return (small, total - small) if auto == "SAME_UPPER" else (total - small, small)


def _patches(x: np.ndarray, node: onnx.NodeProto, kh: int, kw: int) -> np.ndarray:
    """x [C, H, W] -> [C, kh*kw, P] input patches of the conv (its pads, strides and dilations; kernels and
    strides need not be square: PP-OCR's recogniser has 2x1 strides)."""
    top, left, bottom, right = (attribute(node, "pads") or [0, 0, 0, 0])
    sh, sw = (attribute(node, "strides") or [1, 1])
    dh, dw = (attribute(node, "dilations") or [1, 1])
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1                  # the dilated kernel's extent
    auto = attribute(node, "auto_pad")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):   # TF's SAME (MoveNet): pad so that out = ceil(in / stride)
        top, bottom = _same_pads(x.shape[1], eh, sh, auto)
        left, right = _same_pads(x.shape[2], ew, sw, auto)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right)))
    win = sliding_window_view(xp, (eh, ew), axis=(1, 2))[:, ::sh, ::sw, ::dh, ::dw]   # [C, Ho, Wo, kh, kw]
    c = x.shape[0]
    return win.reshape(c, -1, kh * kw).transpose(0, 2, 1)


# ---------------------------------------------------------------------------------------- equalization
def equalize(model: onnx.ModelProto) -> int:
    """Cross-layer equalization of Conv -> (Relu) -> Conv pairs whose middle tensor has no other use;
    returns the number of pairs rescaled. Exact in float."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = 0
    for a in _convs(model):
        out = a.output[0]
        nxt = consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu":
            out = nxt[0].output[0]
            nxt = consumers.get(out, [])
        if len(nxt) != 1 or nxt[0].op_type != "Conv" or nxt[0].input[1] not in inits or len(a.input) < 3:
            continue
        b = nxt[0]
        wa, ba = numpy_helper.to_array(inits[a.input[1]]), numpy_helper.to_array(inits[a.input[2]])
        wb = numpy_helper.to_array(inits[b.input[1]])
        if attribute(b, "group", 1) != 1 or wb.shape[1] != wa.shape[0]:
            continue                     # a depthwise consumer would need the same scale per group
        ra = np.abs(wa).reshape(wa.shape[0], -1).max(1)
        rb = np.abs(wb).transpose(1, 0, 2, 3).reshape(wb.shape[1], -1).max(1)
        scale = np.where((ra > 0) & (rb > 0), np.sqrt(ra / np.maximum(rb, 1e-12)), 1.0).astype(np.float32)
        inits[a.input[1]].CopyFrom(numpy_helper.from_array(wa / scale[:, None, None, None], a.input[1]))
        inits[a.input[2]].CopyFrom(numpy_helper.from_array(ba / scale, a.input[2]))
        inits[b.input[1]].CopyFrom(numpy_helper.from_array(wb * scale[None, :, None, None], b.input[1]))
        pairs += 1
    return pairs


# ------------------------------------------------------------------------------------- second moments
def _statistics(model, convs, feeds) -> dict[str, dict]:
    """Per conv: input channel means, and the second-moment matrix GPTQ needs (per channel for depthwise)."""
    stats = {n.name: {"mean": 0.0, "H": 0.0, "count": 0} for n in convs}
    for values in run_with(model, feeds, sorted({n.input[0] for n in convs})):
        for n in convs:
            x = values[n.input[0]][0].astype(np.float64)              # [C, H, W]
            w_shape = {t.name: t.dims for t in model.graph.initializer}[n.input[1]]
            group = attribute(n, "group", 1)
            st = stats[n.name]
            st["mean"] = st["mean"] + x.mean(axis=(1, 2))
            p = _patches(x, n, w_shape[-2], w_shape[-1])                # [C, kh*kw, P]
            if p.shape[-1] > MAX_POSITIONS:      # a strided subset of positions: H of a wide 3x3 conv at
                p = p[..., ::-(-p.shape[-1] // MAX_POSITIONS)]   # 184x184 would cost ~25 GFLOP per input
            if group == 1:
                flat = p.reshape(-1, p.shape[-1])                        # [C*kk, P]
                st["H"] = st["H"] + flat @ flat.T / flat.shape[1]
            else:
                st["H"] = st["H"] + np.einsum("ckp,clp->ckl", p, p) / p.shape[-1]
            st["count"] += 1
    for st in stats.values():
        st["mean"] /= st["count"]
        st["H"] /= st["count"]
    return stats


def gptq_round(w: np.ndarray, H: np.ndarray, scale: np.ndarray, bits: int = 8, damp: float = 0.01,
               block: int = 128) -> np.ndarray:
    """Integers for w [rows, cols] minimising ||(w - s q) X||, H = X X^T / n. `scale`: one per row [rows] or
    one per weight [rows, cols] (LPBQ blocks). H may be [cols, cols] (shared) or [rows, cols, cols] (one per
    row: depthwise convs)."""
    qmin, qm = -(2 ** (bits - 1)) if bits == 4 else -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    W = w.astype(np.float32).copy()                                   # float32 updates: 2x faster, same integers
    rows, cols = W.shape
    S = np.broadcast_to(scale.astype(np.float32).reshape(rows, -1), (rows, cols))
    if H.ndim == 2:
        H = H.astype(np.float64) + np.eye(cols) * damp * max(np.mean(np.diag(H)), 1e-12)
        dead = np.diag(H) <= 0
        H[dead, dead] = 1.0
        U = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)  # upper: Hinv = U^T U
        Q = np.zeros_like(W)
        for i0 in range(0, cols, block):
            i1 = min(i0 + block, cols)
            Err = np.zeros((rows, i1 - i0), np.float32)
            for i in range(i0, i1):
                q = np.clip(np.rint(W[:, i] / S[:, i]), qmin, qm)
                Q[:, i] = q
                e = (W[:, i] - q * S[:, i]) / U[i, i]
                W[:, i:i1] -= np.outer(e, U[i, i:i1])
                Err[:, i - i0] = e
            W[:, i1:] -= Err @ U[i0:i1, i1:]
        return Q.astype(np.int32)
    diag_mean = np.maximum(np.einsum("rii->r", H) / cols, 1e-12)
    H = H + np.eye(cols)[None] * (damp * diag_mean)[:, None, None]
    U = np.transpose(np.linalg.cholesky(np.linalg.inv(H)), (0, 2, 1))
    Q = np.zeros_like(W)
    for i in range(cols):
        q = np.clip(np.rint(W[:, i] / S[:, i]), qmin, qm)
        Q[:, i] = q
        e = (W[:, i] - q * S[:, i]) / U[:, i, i]
        W[:, i:] -= e[:, None] * U[:, i, i:]
    return Q.astype(np.int32)


# -------------------------------------------------------------------------------------------- recipe
def _set(model, name, array):
    _replace_init(model, name, np.asarray(array, np.float32))


def _split(model: onnx.ModelProto, names: set[str], weights: Mapping[str, np.ndarray]) -> None:
    """Each named Conv(x, W, b) -> Add(Conv(x, s1 q1, b), Conv(x, W - s1 q1)): two int8 convs, ~15-bit weights."""
    split_conv.split_layers(model, dict(weights), {name: None for name in names})


def spread(samples: Sequence, count: int) -> list:
    """`count` samples evenly spaced over the list: calibration sets come grouped by photo (each photo's crops
    together), and the first `count` would all be crops of one photo."""
    if count >= len(samples):
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, count).round().astype(int)]


def _pointwise(node: onnx.NodeProto, w: np.ndarray) -> bool:
    return attribute(node, "group", 1) == 1 and w.shape[-2:] == (1, 1)


def prepare(model: onnx.ModelProto, calibration: Sequence[Mapping], outputs: Sequence[str],
            recipe: CnnRecipe = CnnRecipe()) -> tuple[onnx.ModelProto, dict, CnnReport]:
    """The float graph to hand to the quantizer (equalized, bias-corrected, split) and the integers of the
    sequentially rounded weights, name -> (q, scale)."""
    model = onnx.load_from_string(model.SerializeToString())
    report = CnnReport()
    if recipe.equalize:
        report.equalized_pairs = equalize(model)
    convs = _convs(model)
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.name: numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in convs}
    stats = _statistics(model, convs, spread(calibration, recipe.stat_samples))
    integers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    dequant: dict[str, np.ndarray] = {}
    for n in convs:
        w = weights[n.name]
        scale = channel_scale(w, 8, 0)
        if recipe.sequential_rounding and len(calibration) >= recipe.min_rounding_samples:
            H = stats[n.name]["H"]
            q = gptq_round(w.reshape(w.shape[0], -1), H, scale, damp=recipe.damp).reshape(w.shape)
            report.rounded.append(n.input[1])
        else:
            q = round_to_grid(w, scale, 8, 0)
        integers[n.input[1]] = (q, scale)
        dequant[n.name] = q * scale[:, None, None, None]
    # measured output noise of each layer's rounding alone, relative to each output's signal, summed
    feeds = spread(calibration, recipe.sensitivity_samples)
    outputs = list(outputs)
    ref = list(run_with(model, feeds, outputs))
    signal = {o: sum(float(np.sum(r[o].astype(np.float64) ** 2)) for r in ref) for o in outputs}
    noise: dict[str, float] = {}
    # one session for every layer: conv weights declared as graph inputs are overridable initializers
    probe = onnx.load_from_string(model.SerializeToString())
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(n.input[1], onnx.TensorProto.FLOAT,
                                                                list(weights[n.name].shape)) for n in convs)
    session = quiet_session(probe.SerializeToString())
    del probe
    for n in convs:
        got = [dict(zip(outputs, session.run(outputs, {**dict(f), n.input[1]: dequant[n.name].astype(np.float32)})))
               for f in feeds]
        noise[n.name] = sum(sum(float(np.sum((r[o].astype(np.float64) - g[o]) ** 2)) for r, g in zip(ref, got))
                            / max(signal[o], 1e-30) for o in outputs) / len(outputs)
        report.layer_noise_db[n.name] = -10 * np.log10(max(noise[n.name], 1e-30))
    signal = 1.0
    sizes = {n.name: weights[n.name].size for n in convs}
    others = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                 if t.name.endswith("weight") and t.name not in {n.input[1] for n in convs})
    total = sum(sizes.values()) + others
    remaining, extra, chosen = sum(noise.values()), 0, []
    splittable = {n.name for n in convs if recipe.split_spatial or _pointwise(n, weights[n.name])}
    for name in sorted(splittable, key=lambda k: noise[k] / sizes[k], reverse=True):
        if 10 * np.log10(signal / max(remaining, 1e-30)) >= recipe.target_weight_sqnr_db:
            break
        if (extra + 2 * sizes[name]) / (total + sizes[name]) > recipe.split_budget:
            continue
        chosen.append(name)
        extra += 2 * sizes[name]
        remaining -= noise[name]
    report.bytes_above_8bit_pct = 100.0 * extra / (total + sum(sizes[c] for c in chosen))
    report.predicted_weight_sqnr_db = 10 * np.log10(signal / max(remaining, 1e-30))
    teacher = onnx.load_from_string(model.SerializeToString()) if recipe.qat is not None else None
    report.rounding = "gptq" if report.rounded else "nearest"
    if report.rounded and recipe.quantized_inputs:
        from . import cnn_sequential
        done = cnn_sequential.round_sequentially(model, convs, weights, spread(calibration, recipe.stat_samples),
                                                 set(chosen), damp=recipe.compensation_damp, gptq_damp=recipe.damp,
                                                 bias_correction=recipe.bias_correction)
        integers, report.rounding = done.integers, "gptq-quantized-inputs"
        for n in convs:        # rounded weights on their grid in the graph too, so ranges calibrate on them
            _set(model, n.input[1], done.weights[n.name])
            weights[n.name] = done.weights[n.name]
        for name, value in done.biases.items():
            _set(model, name, value)
    else:                        # rounded against the float inputs: split layers' integers out, biases corrected
        for n in convs:
            w, bias_name = weights[n.name], n.input[2] if len(n.input) > 2 else None
            if n.name in chosen:
                integers.pop(n.input[1])
                continue
            if recipe.bias_correction and bias_name:
                dw = dequant[n.name] - w                                     # [Cout, Cin/g, k, k]
                mean = stats[n.name]["mean"]
                if attribute(n, "group", 1) == 1:
                    shift = dw.sum(axis=(2, 3)) @ mean
                else:
                    shift = dw.sum(axis=(1, 2, 3)) * mean
                _set(model, bias_name, numpy_helper.to_array(inits[bias_name]) - shift)
    report.split = [n.input[1] for n in convs if n.name in chosen]
    if recipe.qat is not None:          # from the rounded, bias-corrected weights; split layers train in float
        from . import cnn_qat
        split_weights = {n.input[1]: n.name for n in convs if n.name in chosen}
        qat = cnn_qat.apply(model, teacher, calibration, outputs, integers, set(split_weights), recipe.qat)
        report.qat = qat.to_dict() if qat else {"qat_steps": 0}
        trained = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in split_weights}
        weights.update({split_weights[k]: v for k, v in trained.items()})
    _split(model, set(chosen), weights)
    log.info("cnn_ptq.prepared", **report.to_dict())
    return model, integers, report


def augment(tensors: Sequence[np.ndarray], copies: int, seed: int = 0) -> list[np.ndarray]:
    """Each preprocessed NCHW input plus `copies - 1` variants: horizontal flips, gain/offset jitter (in the
    normalised space, i.e. exposure and contrast) and small shifts, so that ranges cover frames the few
    calibration photos do not show."""
    rng = np.random.default_rng(seed)
    out = []
    for t in tensors:
        out.append(t)
        std = float(np.std(t)) or 1.0
        for _ in range(copies - 1):
            x = t[..., ::-1] if rng.random() < 0.5 else t
            x = x * rng.uniform(0.8, 1.2) + rng.uniform(-0.15, 0.15) * std
            dy, dx = rng.integers(-8, 9, 2)
            x = np.roll(x, (int(dy), int(dx)), axis=(-2, -1))
            out.append(np.ascontiguousarray(x, dtype=t.dtype))
    return out


def quantize_cnn(float_path: str | Path, out_path: str | Path, calibration: Sequence[Mapping], *,
                 outputs: Sequence[str] | None = None, recipe: CnnRecipe = CnnRecipe()) -> tuple[Path, CnnReport]:
    """The whole W8A16 CNN recipe: float graph at `float_path` -> QDQ graph at `out_path`. Layers are split
    by their noise on `outputs` (default: every graph output, each relative to its own signal)."""
    model = onnx.load(str(float_path))
    outputs = list(outputs or [o.name for o in model.graph.output])
    prepared, integers, report = prepare(model, calibration, outputs, recipe)
    with tempfile.TemporaryDirectory(prefix="cnn-ptq-") as tmp:
        staged = Path(tmp) / "prepared.onnx"
        onnx.save(prepared, str(staged))
        qdq.quantize_qdq(staged, out_path, calibration, "w8a16", integers=integers, exact_scales=False)
    htp_requant.align_file(out_path, concat_scales=True)   # CPU QDQ then computes what the HTP computes
    if recipe.htp_calibration_inputs:       # and the HTP's truncating requantization gets its compensation
        report.htp_truncation = htp_truncation.calibrate_file(
            out_path, spread(calibration, recipe.htp_calibration_inputs)) or {}
    return Path(out_path), report
