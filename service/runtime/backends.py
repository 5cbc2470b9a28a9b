"""Execution-provider backends: one way to open an ONNX Runtime session on `cpu`, `qnn-htp` or `qnn-emulator`.

- `cpu`: the CPU EP, the fast path on x86 hosts.
- `qnn-htp`: onnxruntime-qnn (plugin EP) with the HTP backend on a Snapdragon device.
- `qnn-emulator`: the same library on an x86_64 host, where the HTP backend is a bit-faithful emulator
  (slow; for validation and compiling context binaries).

QNN sessions load a context binary (EPContext model) when the model is one, else compile the model once
into the context cache (keyed by content hash, see `service.modelbuild.qnn_compile`) and load that. At load
the number of graph nodes placed on the NPU and on the CPU is logged and exported as
`incar_runtime_nodes{backend, placement, model}`. The HTP performance mode is a session option and can be
changed on a live session (`set_performance_mode`) by the power governor.
"""
from __future__ import annotations

import json
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import structlog
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

BACKENDS = ("cpu", "qnn-htp", "qnn-emulator")
QNN_BACKENDS = ("qnn-htp", "qnn-emulator")
# QNN HTP performance modes (onnxruntime-qnn `htp_performance_mode`), fastest/most power first.
PERFORMANCE_MODES = ("burst", "sustained_high_performance", "high_performance", "balanced", "low_balanced",
                     "high_power_saver", "power_saver", "low_power_saver", "extreme_power_saver", "default")
DEFAULT_CONTEXT_CACHE = Path(os.environ.get("INCAR_QNN_CACHE", Path(__file__).resolve().parents[2] / "build" / "qnn-cache"))

RUNTIME_NODES = Gauge("incar_runtime_nodes", "Graph nodes of a loaded model by where they run",
                      ["backend", "placement", "model"])

_QNN_LOCK = threading.Lock()
_QNN_REGISTERED = False


class BackendError(RuntimeError):
    """A backend could not open a session; the message says why (shown on gRPC health)."""


@dataclass
class BackendConfig:
    """Runtime backend settings (composed into the service config by the lead)."""
    backend: str = "cpu"
    fallback_backend: str = "cpu"          # used when `backend` fails to load; "" = no fallback
    performance_mode: str = "burst"
    target: str = "emulator"               # context-binary target, see qnn_compile.TARGETS
    context_cache_dir: str = str(DEFAULT_CONTEXT_CACHE)
    disable_cpu_fallback: bool = True      # a QNN graph must run wholly on the HTP
    threads: int = 0                       # 0 = all cores (or INCAR_THREADS)

    def validate(self) -> "BackendConfig":
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.fallback_backend and self.fallback_backend not in BACKENDS:
            raise ValueError(f"fallback_backend: {self.fallback_backend!r} is not one of {', '.join(BACKENDS)}")
        if self.performance_mode not in PERFORMANCE_MODES:
            raise ValueError(f"performance_mode: {self.performance_mode!r} is not one of {', '.join(PERFORMANCE_MODES)}")
        from service.modelbuild.qnn_compile import TARGETS
        if self.target not in TARGETS:
            raise ValueError(f"target: {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0, got {self.threads}")
        return self


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


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # An idle server must not burn CPU: no spin-waiting in ORT's thread pools.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.intra_op_num_threads = threads or int(os.environ.get("INCAR_THREADS", "0")) or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "qnn-htp" and is_emulator_host():
        raise BackendError("qnn-htp: this host is x86_64, where the QNN HTP library is only an emulator; "
                           "use backend 'qnn-emulator' for validation or 'cpu' for speed")


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


def is_context_model(path: str | Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "EPContext" for n in model.graph.node)


def count_nodes(path: str | Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def context_placement(ctx_path: str | Path) -> Placement | None:
    """Counts recorded beside a context binary by the compiler (`<stem>.placement.json`)."""
    sidecar = Path(ctx_path).with_suffix(".placement.json")
    if not sidecar.is_file():
        return None
    data = json.loads(sidecar.read_text())
    return Placement(int(data["npu"]), int(data["cpu"]), data.get("source", "compile"))


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
                   target: str = "emulator", model_name: str | None = None) -> ort.InferenceSession:
    """Open `model_path` on `backend`.

    QNN only: `performance_mode` (see PERFORMANCE_MODES); `context_cache`: True = the default cache
    directory, a path = that directory, False/None = compile online every time (no context binary);
    `target`: the context-binary target (qnn_compile.TARGETS). EPContext models are loaded as they are.
    `model_name` labels the node-placement gauge (default: the file stem).
    """
    check_backend(backend)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise BackendError(f"{backend}: model file {model_path} does not exist")
    name = model_name or model_path.name.removesuffix(".onnx")
    if backend == "cpu":
        try:
            session = ort.InferenceSession(str(model_path), sess_options=session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"cpu: cannot open {model_path.name}: {exc}") from exc
        export_placement(backend, name, Placement(0, count_nodes(model_path), "cpu"))
        return session

    so = qnn_session_options(backend, threads=threads, disable_cpu_fallback=disable_cpu_fallback,
                             provider_options=provider_options, performance_mode=performance_mode)
    placement: Placement | None = None
    load_path = model_path
    if is_context_model(model_path):
        placement = context_placement(model_path)
    elif context_cache:
        from service.modelbuild.qnn_compile import QnnCompileError, cached_context
        cache_dir = DEFAULT_CONTEXT_CACHE if context_cache is True else Path(context_cache)
        try:
            compiled = cached_context(model_path, cache_dir, target, backend=backend,
                                      disable_cpu_fallback=disable_cpu_fallback, provider_options=provider_options)
        except QnnCompileError as exc:
            raise BackendError(f"{backend}: cannot compile {model_path.name}: {exc}") from exc
        load_path, placement = compiled.path, compiled.placement
    elif disable_cpu_fallback:
        # Session creation fails unless every node is placed on QNN.
        placement = Placement(count_nodes(model_path), 0, "no-fallback")
    try:
        session = ort.InferenceSession(str(load_path), sess_options=so)
    except Exception as exc:
        raise BackendError(f"{backend}: cannot open {model_path.name}: {exc}") from exc
    if placement is None:
        log.warning("backend.placement_unknown", backend=backend, model=name,
                    reason="online compile with CPU fallback allowed; use the context cache to count nodes")
    else:
        export_placement(backend, name, placement)
    return session


@dataclass
class LoadedSession:
    session: ort.InferenceSession
    backend: str
    fallback_reason: str = ""              # why the configured backend was not used ("" when it was)
    extra: dict = field(default_factory=dict)


def open_with_fallback(model_path: str | Path, config: BackendConfig, model_name: str | None = None) -> LoadedSession:
    """Open on the configured backend; when it fails and a fallback is configured, use that and say why
    (the caller turns `fallback_reason` into NOT_SERVING/degraded health)."""
    kwargs = dict(threads=config.threads or None, model_name=model_name)
    qnn_kwargs = dict(disable_cpu_fallback=config.disable_cpu_fallback, performance_mode=config.performance_mode,
                      context_cache=config.context_cache_dir, target=config.target)
    try:
        session = create_session(model_path, config.backend, **kwargs,
                                 **(qnn_kwargs if config.backend in QNN_BACKENDS else {}))
        return LoadedSession(session, config.backend)
    except BackendError as exc:
        if not config.fallback_backend or config.fallback_backend == config.backend:
            raise
        log.warning("backend.fallback", wanted=config.backend, using=config.fallback_backend, reason=str(exc))
        session = create_session(model_path, config.fallback_backend, **kwargs,
                                 **(qnn_kwargs if config.fallback_backend in QNN_BACKENDS else {}))
        return LoadedSession(session, config.fallback_backend, fallback_reason=str(exc))
