"""Execution-provider backends: one way to open an ONNX Runtime session on `cpu`, `qnn-htp` or `qnn-emulator`.

- `cpu`: the CPU EP, the fast path on x86 hosts.
- `qnn-htp`: onnxruntime-qnn (plugin EP) with the HTP backend on a Snapdragon device.
- `qnn-emulator`: the same library on an x86_64 host, where the HTP backend is a bit-faithful emulator
  (slow; for validation and compiling context binaries).

QNN sessions load a context binary (EPContext model) when the model is one, else compile the model once
into the context cache (`service.runtime.qnn_context`, for this machine's target) and load that. At load
the number of graph nodes placed on the NPU and on the CPU is logged and exported as
`incar_runtime_nodes{backend, placement, model}`. The HTP performance mode is a session option and can be
changed on a live session (`set_performance_mode`) by the power governor.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import structlog
from prometheus_client import Gauge

from service.runtime import htp_lowering, qnn_context
from service.runtime.providers import (BACKENDS, PERFORMANCE_MODES, QNN_BACKENDS, BackendError, Placement,
                                       check_backend, context_placement, count_nodes, is_context_model,
                                       is_emulator_host, qnn_session_options, session_options)

__all__ = ["BACKENDS", "PERFORMANCE_MODES", "QNN_BACKENDS", "BackendError", "Placement", "count_nodes",
           "create_session", "is_emulator_host", "set_performance_mode"]

log = structlog.get_logger(__name__)

RUNTIME_NODES = Gauge("incar_runtime_nodes", "Graph nodes of a loaded model by where they run",
                      ["backend", "placement", "model"])


def export_placement(backend: str, model: str, placement: Placement) -> None:
    RUNTIME_NODES.labels(backend=backend, placement="npu", model=model).set(placement.npu)
    RUNTIME_NODES.labels(backend=backend, placement="cpu", model=model).set(placement.cpu)
    log.info("backend.placement", backend=backend, model=model, **placement.to_dict())


def set_performance_mode(session: ort.InferenceSession, mode: str) -> None:
    """Change the HTP performance mode of a live QNN session (the power governor's knob)."""
    if mode not in PERFORMANCE_MODES:
        raise BackendError(f"unknown HTP performance mode {mode!r}; expected one of {', '.join(PERFORMANCE_MODES)}")
    if "QNNExecutionProvider" not in session.get_providers():
        raise BackendError("set_performance_mode: the session does not run on QNN")
    try:
        session.set_ep_dynamic_options({"ep.dynamic.qnn_htp_performance_mode": mode})
    except Exception as exc:
        raise BackendError(f"cannot set HTP performance mode {mode!r}: {exc}") from exc


def create_session(model_path: str | Path, backend: str = "cpu", *, threads: int | None = None,
                   disable_cpu_fallback: bool = False, provider_options: dict[str, str] | None = None,
                   performance_mode: str | None = None, context_cache: str | Path | bool | None = True,
                   target: str | None = None, model_name: str | None = None,
                   spin_within_run: bool | int = False) -> ort.InferenceSession:
    """Open `model_path` on `backend`.

    QNN only: `performance_mode` (see PERFORMANCE_MODES); `context_cache`: True = this machine's cache
    (`qnn_context.current().cache_dir`), a path = that directory, False/None = compile online every time (no
    context binary); `target`: the context-binary target (default: this machine's). EPContext models are
    loaded as they are. `model_name` labels the node-placement gauge (default: the file stem).
    CPU only: `spin_within_run` (see `providers.session_options`).
    """
    check_backend(backend)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise BackendError(f"{backend}: model file {model_path} does not exist")
    name = model_name or model_path.name.removesuffix(".onnx")
    if backend == "cpu":
        try:
            session = ort.InferenceSession(str(model_path), sess_options=session_options(threads, spin_within_run),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"cpu: cannot open {model_path.name}: {exc}") from exc
        export_placement(backend, name, Placement(0, count_nodes(model_path), "cpu"))
        return session

    so = qnn_session_options(backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback,
                             provider_options=provider_options, performance_mode=performance_mode)
    placement: Placement | None = None
    load_path = model_path
    context_model = is_context_model(model_path)
    if context_model:
        placement = context_placement(model_path)
    elif context_cache:
        try:
            compiled = qnn_context.cached_context(
                model_path, None if context_cache is True else Path(context_cache), target, backend=backend,
                disable_cpu_fallback=disable_cpu_fallback, provider_options=provider_options)
        except qnn_context.QnnCompileError as exc:
            raise BackendError(f"{backend}: cannot compile {model_path.name}: {exc}") from exc
        load_path, placement = compiled.path, compiled.placement
    elif disable_cpu_fallback:
        # Session creation fails unless every node is placed on QNN.
        placement = Placement(count_nodes(model_path), 0, "no-fallback")
    source = str(load_path)
    if load_path == model_path and not context_model:        # compiled online: lower it first
        source = htp_lowering.lowered_bytes(model_path) or source
    try:
        session = ort.InferenceSession(source, sess_options=so)
    except Exception as exc:
        raise BackendError(f"{backend}: cannot open {model_path.name}: {exc}") from exc
    if placement is None:
        log.warning("backend.placement_unknown", backend=backend, model=name,
                    reason="online compile with CPU fallback allowed; use the context cache to count nodes")
    else:
        export_placement(backend, name, placement)
    return session
