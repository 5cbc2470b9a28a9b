"""Quantization of float graphs: QDQ for the QNN HTP (onnxruntime's QNN tooling) and the CPU weight-only
variants, plus the per-component accuracy report (SQNR dB / RMS % against float on held-out inputs).

Precisions (names as in the bundle manifest):
- `w8a16`:    int8 symmetric per-channel weights on every Conv/MatMul/Gemm, uint16 activations. The channel
              axis is set for each weight through `init_overrides`: `get_qnn_qdq_config(per_channel=True)`
              makes only Conv per-channel and leaves MatMul per-tensor without a word (shared/quant-notes.md);
              `weight_codec.weight_encodings` checks what a written graph really holds.
- `w8pc-a16`: the same recipe under its older manifest name.
- `w4a16`:    LPBQ on the MatMul weights (4-bit blocks of 64 along the input axis on an 8-bit per-channel
              grid, `weight_codec.to_lpbq`), int8 per-channel on the rest: the lm_head (`keep_8bit`), convs,
              and any MatMul whose input size is not a multiple of the block. Plain int4 per-channel reached
              ~20 dB; asymmetric int4 is rejected by the HTP (error 3110). From a 4-bit GGUF the codes can
              come from the file instead (`lpbq_codes`, blocks of 32: `gguf_lpbq`).
- `int4` / `int8` (CPU EP): weight-only MatMulNBits (block 32, symmetric, accuracy_level 4) on the layer
              weights, the bundle's own recipe (`cpu_quant.py`).
Weights can also come pre-rounded (`integers`: name -> (q, scale), e.g. from sequential rounding in
`cnn_ptq.py`); onnxruntime places the QDQ nodes and calibrates, our integers replace its rounding.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import structlog

from . import weight_codec

log = structlog.get_logger(__name__)

QDQ_PRECISIONS = ("w8a16", "w8pc-a16", "w4a16")
CPU_PRECISIONS = ("int4", "int8")
PRECISIONS = QDQ_PRECISIONS + CPU_PRECISIONS
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
LPBQ_BLOCK = 64
KEEP_8BIT = ("lm_head", "embed")      # W4A16 keeps the head and embeddings at 8 bits (AI Hub's recipe)


class QuantizationError(RuntimeError):
    pass


def calibration_reader(samples: Sequence[Mapping[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        """Feeds calibration samples (dicts of graph inputs) one at a time."""

        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:  # the QNN tooling may read twice (e.g. for 16-bit overrides)
            self._it = iter(samples)

        def __len__(self) -> int:  # strided MinMax calibration asks
            return len(samples)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(samples[start_index:end_index])
    return ListReader()


def weight_initializers(model: onnx.ModelProto) -> dict[str, int]:
    """Name -> output-channel axis of every MatMul/Gemm/Conv/ConvTranspose weight that is an initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if len(inits[node.input[1]].dims) < 2:
            continue
        if node.op_type == "MatMul":
            axis = len(inits[node.input[1]].dims) - 1       # [.., K, N]: channels are the last axis
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        elif node.op_type == "ConvTranspose":
            axis = 1                                        # IOHW: output channels second
        else:
            axis = 0                                        # Conv OIHW
        out[node.input[1]] = axis
    return out


def model_bytes(path: Path, model: onnx.ModelProto | None = None) -> int:
    """Size of a model file plus the external data files it references."""
    model = model or onnx.load(str(path), load_external_data=False)
    files = {d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def weight_overrides(model: onnx.ModelProto, quant_type, lpbq: Iterable[str] = ()) -> dict[str, list[dict]]:
    """`init_overrides` making every weight symmetric per-channel on its output axis (`lpbq` ones int4: they
    are re-encoded as LPBQ after quantization)."""
    from onnxruntime.quantization import QuantType
    lpbq = set(lpbq)
    return {name: [{"quant_type": QuantType.QInt4 if name in lpbq else quant_type, "symmetric": True, "axis": axis}]
            for name, axis in weight_initializers(model).items()}


# Ops the HTP computes in a fixed uint16 output encoding whatever the graph's Q node says (onnxruntime's QNN config
# already fixes Sigmoid and Tanh). Measured on the emulator: a HardSigmoid of its own (not fused into the conv
# before it) writes f(x) x 65536 whatever its scale, so with a calibrated range [0, 0.61] (PP-OCR's
# squeeze-excitation gates) its codes read 0.61x too small; CPU QDQ then computes what the HTP does.
FIXED_OUTPUT_ENCODINGS = {"HardSigmoid": (1.0 / 65536.0, 0)}


def fixed_output_overrides(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """`init_overrides` giving each FIXED_OUTPUT_ENCODINGS op's output the encoding the HTP computes it in."""
    from onnxruntime.quantization import QuantType
    return {node.output[0]: [{"quant_type": QuantType.QUInt16,
                              "scale": np.array(FIXED_OUTPUT_ENCODINGS[node.op_type][0], np.float32),
                              "zero_point": np.array(FIXED_OUTPUT_ENCODINGS[node.op_type][1], np.uint16)}]
            for node in model.graph.node if node.op_type in FIXED_OUTPUT_ENCODINGS}


def lpbq_candidates(model: onnx.ModelProto, block: int = LPBQ_BLOCK, keep_8bit: Sequence[str] = KEEP_8BIT) -> list[str]:
    """MatMul weights W4A16 puts on LPBQ: [K, N] with K a multiple of `block`, none matching `keep_8bit`."""
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        if (len(dims) == 2 and dims[0] % block == 0 and node.input[1].endswith(".weight")
                and not any(k in node.input[1] for k in keep_8bit)):
            names.append(node.input[1])
    return names


def _stride(samples: int, wanted: int) -> int:
    """The largest stride <= wanted that divides the sample count (onnxruntime's strided MinMax needs one)."""
    return next(s for s in range(min(wanted, samples), 0, -1) if samples % s == 0)


def quantize_qdq(float_path: str | Path, out_path: str | Path, calibration: Sequence[Mapping[str, np.ndarray]],
                 precision: str = "w8a16", *, integers: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 block: int = LPBQ_BLOCK, keep_8bit: Sequence[str] = KEEP_8BIT, calib_stride: int = 16,
                 range_cache: str | Path | None = None,
                 hessians: Mapping[str, np.ndarray] | None = None,
                 lpbq_codes: Mapping[str, weight_codec.Lpbq] | None = None, exact_scales: bool = True) -> Path:
    """Write a QDQ model for the HTP. `calibration`: graph-input dicts (keep held-out ones apart); ranges
    are MinMax over all of them, gathered `calib_stride` samples at a time (bounded memory). `range_cache`:
    a JSON file of activation ranges, written on the first call and read by later ones on the same float
    graph (W8A16 and W4A16 share ranges: they depend on the float activations only). `hessians`: MatMul
    weight name -> input second moments [K, K] (`sequential.linear_hessians`); those weights are rounded
    sequentially (GPTQ) on their int8 per-channel or LPBQ grid instead of to nearest. `lpbq_codes` (w4a16):
    weight name -> LPBQ encoding to write as given, e.g. a GGUF's own 4-bit codes (`gguf_lpbq`); then only
    those weights are LPBQ and every other weight stays int8 per-channel. `exact_scales`: every per-channel
    weight's scales moved (by under 2^-12) so that the HTP's 11-bit requantization multipliers are exact and above
    their floors (`htp_requant`; SmolLM2's first 6 layers on the emulator: 2.9 -> 0.3 dB under CPU QDQ, 4 held-out
    chunks, bench/htp_attention.py);
    off for callers that align after their own scale changes (the CNN recipe)."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if precision not in QDQ_PRECISIONS:
        raise QuantizationError(f"precision {precision!r} is not a QDQ precision ({', '.join(QDQ_PRECISIONS)})")
    if not calibration:
        raise QuantizationError("calibration: no samples")
    float_path, out_path = Path(float_path), Path(out_path)
    model = onnx.load(str(float_path), load_external_data=False)
    lpbq = lpbq_candidates(model, block, keep_8bit) if precision == "w4a16" else []
    if lpbq_codes:
        if precision != "w4a16":
            raise QuantizationError(f"lpbq_codes: given for {precision}; copied 4-bit codes are a w4a16 recipe")
        graph_weights = set(weight_initializers(model))
        missing = sorted(set(lpbq_codes) - graph_weights)
        if missing:
            raise QuantizationError(f"lpbq_codes: {missing[:3]} are not MatMul weights of {float_path.name}")
        lpbq = list(lpbq_codes)
    overrides = weight_overrides(model, QuantType.QInt8, lpbq)
    if not overrides:
        raise QuantizationError(f"{float_path.name}: no MatMul/Gemm/Conv weights to quantize")
    overrides.update(fixed_output_overrides(model))
    started = time.monotonic()
    config = get_qnn_qdq_config(str(float_path), calibration_reader(calibration), activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QUInt8, per_channel=False, init_overrides=overrides,
                                stride=_stride(len(calibration), calib_stride))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    big = model_bytes(float_path, model) > 1.9e9     # protobuf's 2 GB limit
    config.use_external_data_format = big
    if range_cache is None:
        quantize(str(float_path), str(out_path), config)
    else:
        from onnxruntime.quantization import quantize_static
        quantize_static(str(float_path), str(out_path), config.calibration_data_reader,
                        calibrate_method=config.calibrate_method, quant_format=config.quant_format,
                        activation_type=config.activation_type, weight_type=config.weight_type,
                        op_types_to_quantize=config.op_types_to_quantize, nodes_to_quantize=config.nodes_to_quantize,
                        nodes_to_exclude=config.nodes_to_exclude, per_channel=config.per_channel,
                        reduce_range=config.reduce_range, use_external_data_format=big,
                        calibration_providers=config.calibration_providers, extra_options=config.extra_options,
                        calibration_cache_path=str(range_cache))
    if lpbq or integers or hessians:
        from .sequential import round_weights
        quantized = onnx.load(str(out_path))
        floats = {}
        if lpbq or hessians:
            full = onnx.load(str(float_path))
            wanted = set(lpbq) | set(hessians or {})
            floats = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer if t.name in wanted}
            del full
        rounded, encodings = round_weights(floats, {k: v for k, v in (hessians or {}).items()
                                                    if k not in (lpbq_codes or {})}, set(lpbq), block)
        encodings.update(lpbq_codes or {})
        for name, (q, scale) in {**rounded, **(integers or {})}.items():
            weight_codec.set_weight(quantized, name, q, scale)
        for name in lpbq:
            enc = encodings.get(name)
            weight_codec.to_lpbq(quantized, name, floats[name], enc.block if enc else block, enc)
        for stale in out_path.parent.glob(out_path.name + ".data"):
            stale.unlink()
        onnx.save_model(quantized, str(out_path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=out_path.name + ".data")
    aligned = 0
    if exact_scales:
        from . import htp_requant
        aligned = htp_requant.align_file(out_path)
    log.info("qdq.quantized", model=float_path.name, precision=precision, samples=len(calibration),
             lpbq=len(lpbq), rounded=len(integers or {}) + len(hessians or {}), exact_scales=aligned,
             seconds=round(time.monotonic() - started, 2))
    return out_path


def recipe_name(precision: str, *, lpbq_codes: Mapping | None = None, hessians: Mapping | None = None,
                block: int = LPBQ_BLOCK, **_) -> str:
    """The short name of what `quantize_qdq` does with these options (manifests, bench keys)."""
    if precision == "w4a16" and lpbq_codes:
        from .gguf_lpbq import RECIPE
        return RECIPE
    base = f"lpbq{block}-int4" if precision == "w4a16" else "per-channel-int8"
    return base + ("-gptq" if hessians else "-nearest") + "-a16"


def quantize_cpu(float_path: str | Path, out_path: str | Path, precision: str = "int4",
                 block_size: int | None = None) -> Path:
    """CPU EP weight-only variants, exactly as the bundle writer makes them (`cpu_quant.quantize_weights`):
    int4 / int8 MatMulNBits on the layer weights only, so reports measure what ships. (A generic
    `quantize_dynamic` here used to quantize the attention score/context MatMuls too, activations x
    activations at uint8, which the bundle never does.)"""
    from .cpu_quant import BLOCK_SIZE, quantize_weights

    if precision not in CPU_PRECISIONS:
        raise QuantizationError(f"precision {precision!r} is not a CPU precision ({', '.join(CPU_PRECISIONS)})")
    float_path, out_path = Path(float_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = quantize_weights(onnx.load(str(float_path)), bits=4 if precision == "int4" else 8,
                             block_size=block_size or BLOCK_SIZE)
    if not any(n.op_type == "MatMulNBits" for n in model.graph.node):
        raise QuantizationError(f"{float_path.name}: no MatMul layer weights (`*.weight`) to quantize to {precision}")
    big = model.ByteSize() > 1.9e9
    onnx.save_model(model, str(out_path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=out_path.name + ".data")
    return out_path


def quantize_variant(float_path: str | Path, out_path: str | Path, precision: str,
                     calibration: Sequence[Mapping[str, np.ndarray]] = (), **recipe) -> Path:
    if precision in QDQ_PRECISIONS:
        return quantize_qdq(float_path, out_path, calibration, precision, **recipe)
    return quantize_cpu(float_path, out_path, precision)


# ------------------------------------------------------------------------------------------------ report
def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (float64 sums over every element)."""
    ref = np.asarray(reference, np.float64)
    noise = np.sum((ref - np.asarray(test, np.float64)) ** 2)
    signal = np.sum(ref ** 2)
    if noise == 0:
        return math.inf
    return float(10.0 * np.log10(signal / noise))


def rms_error_pct(reference: np.ndarray, test: np.ndarray) -> float:
    """RMS of the error as a percentage of the RMS of the reference."""
    ref = np.asarray(reference, np.float64)
    err = np.sqrt(np.mean((ref - np.asarray(test, np.float64)) ** 2))
    return float(100.0 * err / np.sqrt(np.mean(ref ** 2)))


@dataclass
class AccuracyReport:
    component: str
    precision: str
    backend: str
    output: str
    samples: int
    sqnr_db: float
    rms_pct: float

    def to_dict(self) -> dict:
        return {"component": self.component, "precision": self.precision, "backend": self.backend,
                "output": self.output, "samples": self.samples,
                "sqnr_db": round(self.sqnr_db, 2), "rms_pct": round(self.rms_pct, 4)}


def compare(reference: Iterable[np.ndarray], test: Iterable[np.ndarray], *, component: str, precision: str,
            backend: str, output: str) -> AccuracyReport:
    ref = [np.asarray(r, np.float64).ravel() for r in reference]
    got = [np.asarray(t, np.float64).ravel() for t in test]
    if len(ref) != len(got) or not ref:
        raise ValueError(f"compare: {len(ref)} reference outputs vs {len(got)} test outputs")
    r, t = np.concatenate(ref), np.concatenate(got)
    return AccuracyReport(component, precision, backend, output, len(ref), sqnr_db(r, t), rms_error_pct(r, t))


def evaluate(float_session, quant_session, held_out: Sequence[Mapping[str, np.ndarray]], *, component: str,
             precision: str, backend: str, output: str | None = None,
             run: Callable | None = None) -> AccuracyReport:
    """Run both sessions on held-out inputs (never the calibration set) and compare one output."""
    output = output or float_session.get_outputs()[0].name
    run = run or (lambda sess, feed: sess.run([output], dict(feed))[0])
    ref = [run(float_session, feed) for feed in held_out]
    got = [run(quant_session, feed) for feed in held_out]
    return compare(ref, got, component=component, precision=precision, backend=backend, output=output)
