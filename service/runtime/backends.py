"""Execution-provider backends: one way to open an ONNX Runtime session on `cpu`, `qnn-htp` or `qnn-emulator`.

First cut by the foundation; the runtime work owns and extends it (context binaries, node placement, HTP performance mode).
"""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

BACKENDS = ("cpu", "qnn-htp", "qnn-emulator")
_QNN_REGISTERED = False


class BackendError(RuntimeError):
    """A backend could not open a session; the message says why (shown on gRPC health)."""


def _register_qnn() -> None:
    global _QNN_REGISTERED
    if _QNN_REGISTERED:
        return
    try:
        import onnxruntime_qnn
    except ImportError as exc:  # pragma: no cover - the package is a declared dependency
        raise BackendError(f"onnxruntime-qnn is not installed: {exc}") from exc
    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    _QNN_REGISTERED = True


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # An idle server must not burn CPU: no spin-waiting in ORT's thread pools.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads = threads or int(os.environ.get("INCAR_THREADS", "0")) or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def create_session(model_path: str | Path, backend: str = "cpu", *, threads: int | None = None,
                   disable_cpu_fallback: bool = False, provider_options: dict[str, str] | None = None
                   ) -> ort.InferenceSession:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    so = session_options(threads)
    if backend == "cpu":
        return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
    _register_qnn()
    import onnxruntime_qnn
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise BackendError("no QNN device found (onnxruntime-qnn loaded, but it reports no device)")
    options = {"backend_path": onnxruntime_qnn.get_qnn_htp_path()}
    options.update(provider_options or {})
    so.add_provider_for_devices(devices, options)
    if disable_cpu_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        return ort.InferenceSession(str(model_path), sess_options=so)
    except Exception as exc:
        raise BackendError(f"{backend}: cannot open {Path(model_path).name}: {exc}") from exc
