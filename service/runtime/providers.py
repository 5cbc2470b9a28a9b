"""Execution-provider facts shared by sessions and the context compiler: the backend names, session options
(CPU and QNN HTP), and how many graph nodes run where."""
from __future__ import annotations

import json
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from service.htp_modes import SESSION_MODES

BACKENDS = ("cpu", "qnn-htp", "qnn-emulator")
QNN_BACKENDS = ("qnn-htp", "qnn-emulator")
PERFORMANCE_MODES = SESSION_MODES       # QNN HTP performance modes a session accepts

_QNN_LOCK = threading.Lock()
_QNN_REGISTERED = False


class BackendError(RuntimeError):
    """A backend could not open a session; the message says why (shown on gRPC health)."""


@dataclass
class Placement:
    npu: int
    cpu: int
    source: str = ""                       # how it was counted

    def to_dict(self) -> dict:
        return {"npu": self.npu, "cpu": self.cpu, "source": self.source}


def is_emulator_host() -> bool:
    """The Linux x86_64 onnxruntime-qnn wheel ships the HTP backend as an emulator."""
    return platform.machine().lower() in ("x86_64", "amd64")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "qnn-htp" and is_emulator_host():
        raise BackendError("qnn-htp: this host is x86_64, where the QNN HTP library is only an emulator; "
                           "use backend 'qnn-emulator' for validation or 'cpu' for speed")


def _register_qnn() -> None:
    global _QNN_REGISTERED
    with _QNN_LOCK:
        if _QNN_REGISTERED:
            return
        try:
            import onnxruntime_qnn
        except ImportError as exc:  # pragma: no cover - the package is a declared dependency
            raise BackendError(f"onnxruntime-qnn is not installed: {exc}") from exc
        try:
            ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
        except Exception as exc:
            raise BackendError(f"cannot register the QNN execution provider: {exc}") from exc
        _QNN_REGISTERED = True


# Bounded in-run spinning (measured, docs/model-bundle.md "CPU session options"): an idle worker spins this long
# for the next op before it sleeps. On quiet cores 20 us decodes as fast as unbounded spinning (~140 vs ~95 tok/s
# without, 2 threads; the decoder's ops are a few us apart); with every core taken by other work, against no
# spinning, unbounded spinning loses 30-45 %, 50 us ~20 %, 20 us 5-20 %. 5 us is too short to bridge two ops.
SPIN_US = 20


def spin_us_from_env() -> int:
    """The CPU decoder's spin bound: INCAR_CPU_SPIN=0 turns spinning off, INCAR_CPU_SPIN_US sets the bound."""
    if os.environ.get("INCAR_CPU_SPIN", "1") == "0":
        return 0
    try:
        return max(0, int(os.environ.get("INCAR_CPU_SPIN_US", str(SPIN_US))))
    except ValueError as exc:
        raise BackendError(f"INCAR_CPU_SPIN_US must be a whole number of microseconds: {exc}") from exc


def spin_bound_us(spin_within_run: bool | int) -> int:
    """Microseconds an idle worker spins: True = `SPIN_US`, False = 0, else the number given."""
    return SPIN_US if spin_within_run is True else int(spin_within_run)


def session_options(threads: int | None = None, spin_within_run: bool | int = False) -> ort.SessionOptions:
    """CPU session options. `spin_within_run`: False/0 = workers never spin (an idle server burns no CPU); an int
    = microseconds an idle worker spins for the next op of the same Run (True = `SPIN_US`); spinning stops when
    the Run returns (`force_spinning_stop`). Many small ops per token (the decoder) need it: waking a sleeping
    worker per op cost about a third of the 2-thread decode speed here."""
    so = ort.SessionOptions()
    spin_us = spin_bound_us(spin_within_run)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us > 0 else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if spin_us > 0:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.intra_op_num_threads = threads or int(os.environ.get("INCAR_THREADS", "0")) or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def qnn_session_options(backend: str, *, threads: int | None = None, disable_cpu_fallback: bool = False,
                        provider_options: dict[str, str] | None = None,
                        performance_mode: str | None = None) -> ort.SessionOptions:
    """Session options with the QNN HTP provider added (shared by sessions and the context compiler)."""
    check_backend(backend)
    if backend not in QNN_BACKENDS:
        raise BackendError(f"{backend}: not a QNN backend")
    _register_qnn()
    import onnxruntime_qnn
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise BackendError(f"{backend}: no QNN device found (onnxruntime-qnn loaded, but it reports no device)")
    options = {"backend_path": onnxruntime_qnn.get_qnn_htp_path()}
    if performance_mode:
        if performance_mode not in PERFORMANCE_MODES:
            raise BackendError(f"{backend}: unknown HTP performance mode {performance_mode!r}; "
                               f"expected one of {', '.join(PERFORMANCE_MODES)}")
        options["htp_performance_mode"] = performance_mode
    options.update({k: str(v) for k, v in (provider_options or {}).items()})
    so = session_options(threads)
    so.add_provider_for_devices(devices, options)
    if disable_cpu_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def count_nodes(path: str | Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def is_context_model(path: str | Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "EPContext" for n in model.graph.node)


def context_placement(ctx_path: str | Path) -> Placement | None:
    """Counts recorded beside a context binary by the compiler (`<stem>.placement.json`)."""
    sidecar = Path(ctx_path).with_suffix(".placement.json")
    if not sidecar.is_file():
        return None
    data = json.loads(sidecar.read_text())
    return Placement(int(data["npu"]), int(data["cpu"]), data.get("source", "compile"))
