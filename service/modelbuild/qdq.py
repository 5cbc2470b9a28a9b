"""Quantization of float graphs: QDQ for the QNN HTP (onnxruntime's QNN tooling) and the CPU weight-only
variants, plus the per-component accuracy report (SQNR dB / RMS % against float on held-out inputs).

Precisions (names as in the bundle manifest):
- `w8a16`:    uint8 per-tensor weights, uint16 activations (vision default).
- `w8pc-a16`: int8 symmetric per-channel weights, uint16 activations (the language fallback).
- `w4a16`:    int4 symmetric per-channel weights set through `init_overrides`, uint16 activations. This is
              the recipe that is right on the HTP: `get_qnn_qdq_config(weight_type=QInt4, per_channel=True)`
              leaves MatMul weights per-tensor and asymmetric (runs, ~6 dB), and asymmetric int4 per-channel
              is rejected (error 3110). See shared/qnn-notes.md.
- `int4` / `int8` (CPU EP): weight-only MatMulNBits (block 32, symmetric, accuracy_level 4) on the layer
              weights, the bundle's own recipe (`cpu_quant.py`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import structlog

log = structlog.get_logger(__name__)

QDQ_PRECISIONS = ("w8a16", "w8pc-a16", "w4a16")
CPU_PRECISIONS = ("int4", "int8")
PRECISIONS = QDQ_PRECISIONS + CPU_PRECISIONS
_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1}


class QuantizationError(RuntimeError):
    pass


def _reader(samples: Sequence[Mapping[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        """Feeds calibration samples (dicts of graph inputs) one at a time."""

        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:  # the QNN tooling may read twice (e.g. for 16-bit overrides)
            self._it = iter(samples)
    return ListReader()


def weight_initializers(model: onnx.ModelProto) -> dict[str, int]:
    """Name -> output-channel axis of every MatMul/Gemm/Conv weight that is an initializer."""
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
        else:
            axis = 0                                        # Conv OIHW
        out[node.input[1]] = axis
    return out


def model_bytes(path: Path, model: onnx.ModelProto | None = None) -> int:
    """Size of a model file plus the external data files it references."""
    model = model or onnx.load(str(path), load_external_data=False)
    files = {d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def quantize_qdq(float_path: str | Path, out_path: str | Path, calibration: Sequence[Mapping[str, np.ndarray]],
                 precision: str = "w8a16") -> Path:
    """Write a QDQ model for the HTP. `calibration`: graph-input dicts (keep held-out ones apart)."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if precision not in QDQ_PRECISIONS:
        raise QuantizationError(f"precision {precision!r} is not a QDQ precision ({', '.join(QDQ_PRECISIONS)})")
    if not calibration:
        raise QuantizationError("calibration: no samples")
    float_path, out_path = Path(float_path), Path(out_path)
    model = onnx.load(str(float_path), load_external_data=False)
    kwargs: dict = {"activation_type": QuantType.QUInt16}
    if precision == "w8a16":
        kwargs.update(weight_type=QuantType.QUInt8, per_channel=False)
    elif precision == "w8pc-a16":
        kwargs.update(weight_type=QuantType.QInt8, per_channel=True, weight_symmetric=True)
    else:
        overrides = {name: [{"quant_type": QuantType.QInt4, "symmetric": True, "axis": axis}]
                     for name, axis in weight_initializers(model).items()}
        if not overrides:
            raise QuantizationError(f"{float_path.name}: no MatMul/Gemm/Conv weights to quantize to int4")
        kwargs.update(weight_type=QuantType.QUInt8, per_channel=False, init_overrides=overrides)
    started = time.monotonic()
    config = get_qnn_qdq_config(str(float_path), _reader(calibration), **kwargs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config.use_external_data_format = model_bytes(float_path, model) > 1.9e9   # protobuf's 2 GB limit
    quantize(str(float_path), str(out_path), config)
    log.info("qdq.quantized", model=float_path.name, precision=precision, samples=len(calibration),
             seconds=round(time.monotonic() - started, 2))
    return out_path


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
                     calibration: Sequence[Mapping[str, np.ndarray]] = ()) -> Path:
    if precision in QDQ_PRECISIONS:
        return quantize_qdq(float_path, out_path, calibration, precision)
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
