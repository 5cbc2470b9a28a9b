"""Fit a QDQ graph's HTP truncation compensation on the emulator (service/runtime/htp_lowering.py says why).

The HTP's truncating requantization loses a kernel-dependent share of an accumulator unit per conv output,
and QNN's fusions make a lone conv's loss differ from what the whole graph loses; so the compensation is
measured where it acts. Each candidate is compiled exactly as the runtime compiles the shipped file (the
QNN HTP emulator, CPU fallback off, `create_session` applying the lowering from the file's metadata), run on
calibration inputs, and scored by how close its outputs come to CPU QDQ's on the same inputs. The best
candidate is recorded in the file; 0 (no compensation) is a candidate, so a graph the lowering would not help
is left as it is.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import structlog

from service.modelbuild import qdq
from service.modelbuild.htp_requant import save_beside_data
from service.runtime import htp_lowering
from service.runtime.backends import create_session
from service.runtime.providers import BackendError

log = structlog.get_logger("incar.modelbuild.htp_truncation")

# accumulator units per signed conv output; measured optima of the perception models lie at 160-224
CANDIDATES = (0, 64, 128, 160, 192, 224, 256)


def _score(cpu: list[list[np.ndarray]], htp: list[list[np.ndarray]]) -> float:
    """Mean over the graph's outputs of HTP-vs-CPU SQNR (dB), each pooled over the inputs (one run per input)."""
    pooled = [(np.concatenate([run[i].ravel() for run in cpu]), np.concatenate([run[i].ravel() for run in htp]))
              for i in range(len(cpu[0]))]
    return float(np.mean([min(qdq.sqnr_db(c, h), 200.0) for c, h in pooled]))      # identical output: 200


def calibrate_file(qdq_path: str | Path, feeds: Sequence[Mapping], candidates: Sequence[int] = CANDIDATES
                   ) -> dict | None:
    """Record in `qdq_path` the candidate whose HTP outputs come nearest CPU QDQ's on `feeds`. Returns
    {"units", "htp_vs_cpu_db": {candidate: dB}}, or None (file unchanged) when the QNN emulator is missing."""
    qdq_path = Path(qdq_path)
    model = onnx.load(str(qdq_path))
    if not any(n.op_type == "Conv" for n in model.graph.node):
        return None
    cpu_session = create_session(qdq_path, "cpu", model_name=f"{qdq_path.stem}.calibration")
    cpu = [cpu_session.run(None, dict(f)) for f in feeds]
    scores: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="htp-truncation-") as tmp:
        trial = Path(tmp) / qdq_path.name
        for units in candidates:
            htp_lowering.set_truncation_units(model, units)
            onnx.save(model, str(trial))
            try:
                session = create_session(trial, "qnn-emulator", disable_cpu_fallback=True, context_cache=False,
                                         model_name=f"{qdq_path.stem}.calibration")
            except BackendError as exc:
                log.warning("htp_truncation.skipped", model=qdq_path.name, reason=str(exc))
                return None
            scores[units] = round(_score(cpu, [session.run(None, dict(f)) for f in feeds]), 2)
    best = max(scores, key=lambda u: (scores[u], -u))
    htp_lowering.set_truncation_units(model, best)
    save_beside_data(model, qdq_path)
    log.info("htp_truncation.calibrated", model=qdq_path.name, units=best, htp_vs_cpu_db=scores)
    return {"units": best, "htp_vs_cpu_db": scores}
