"""QNN context binaries (EPContext models): the SoC targets, which one this machine runs, and the cache.

A context binary is compiled for one HTP architecture and SoC. `TARGETS` names the targets the project
builds; `current().target` is this machine's: `runtime.qnn_target` when configured, else the SoC's own
(`/sys/devices/soc0/machine`, e.g. SA8295P -> `sa8295p-v68`), else `emulator` (QNN's default options, v68),
which is also what an x86 host's emulator runs. Bundles ship context binaries per target; the runtime loads the
one for `current().target` and compiles (once, cached) what a bundle does not ship.

The cache (`current().cache_dir`, `<server.data_dir>/qnn-cache` in the service) is keyed by content hash:
the model and its external data, the target's provider options and the onnxruntime / onnxruntime-qnn
versions, so any change recompiles. It lives with the service's data, never inside the installed package
(a container's non-root user cannot write site-packages).

Facts this relies on (shared/qnn-notes.md): `ort.ModelCompiler` needs ORT_ENABLE_BASIC (with optimizations
off, unfolded shape sub-graphs land on the CPU and the compile fails); `soc_model=39` selects SA8295P (v68,
8 MB VTCM). The emulator does not check the architecture, so a context that loads there proves nothing about
a device: build for the car's target and test there.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import structlog

from service.runtime import htp_lowering
from service.runtime.bundle import Bundle, BundleError, hash_file
from service.runtime.providers import (QNN_BACKENDS, BackendError, Placement, count_nodes, is_emulator_host,
                                       qnn_session_options)

log = structlog.get_logger(__name__)

TARGETS: dict[str, dict[str, str]] = {
    "emulator": {},                                 # QNN's default options (v68): the x86 emulator
    "sa8295p-v68": {"soc_model": "39"},             # SA8295P cockpit SoC, Hexagon v68
}
# The SoC names Linux reports (/sys/devices/soc0/machine) -> the target their context binaries are built for.
SOC_TARGETS: dict[str, str] = {"SA8295P": "sa8295p-v68"}
SOC_MACHINE_FILE = Path("/sys/devices/soc0/machine")
# Options that change only how a context runs, not what is compiled.
_RUNTIME_ONLY_OPTIONS = {"htp_performance_mode", "backend_path", "profiling_level", "profiling_file_path"}


class QnnCompileError(RuntimeError):
    pass


def detect_target(machine_file: Path = SOC_MACHINE_FILE, *, emulator: bool | None = None) -> str:
    """The target of this machine's SoC; `emulator` on an x86 host or an SoC the project has no target for."""
    if is_emulator_host() if emulator is None else emulator:
        return "emulator"
    try:
        soc = machine_file.read_text().strip().upper()
    except OSError:
        soc = ""
    target = SOC_TARGETS.get(soc)
    if target is None:
        log.warning("qnn.soc_without_target", soc=soc or "unknown", using="emulator",
                    hint="set runtime.qnn_target, or add the SoC to SOC_TARGETS")
        return "emulator"
    return target


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"expected one of {', '.join(TARGETS)} or '' (the SoC's own), got {target!r}")
    return target


@dataclass(frozen=True)
class QnnSite:
    """This machine's QNN facts: the context-binary target and where compiled contexts are cached."""
    target: str
    cache_dir: Path


def _default_cache_dir() -> Path:
    return Path(os.environ.get("INCAR_QNN_CACHE") or Path(os.environ.get("INCAR_DATA_DIR", "data")) / "qnn-cache")


_site: QnnSite | None = None


def configure(target: str = "", cache_dir: str | Path | None = None) -> QnnSite:
    """Set the machine's target ("" = detect from the SoC) and cache folder; the service calls this at start."""
    global _site
    _site = QnnSite(check_target(target) if target else detect_target(),
                    Path(cache_dir) if cache_dir else _default_cache_dir())
    log.info("qnn.site", target=_site.target, cache_dir=str(_site.cache_dir))
    return _site


def current() -> QnnSite:
    return _site if _site is not None else configure()


def context_binary(bundle: Bundle, entry: dict, backend: str, target: str | None = None) -> Path | None:
    """The context binary a bundle ships for one variant (`entry["context_binaries"][target]`, default target:
    this machine's), or None: not on QNN, or not shipped (the session then compiles once into the cache)."""
    if backend not in QNN_BACKENDS:
        return None
    target = target or current().target
    ctx = (entry.get("context_binaries") or {}).get(target)
    if not ctx:
        return None
    try:
        return bundle.file(ctx)
    except BundleError as exc:
        log.warning("qnn.context_binary_missing", target=target, file=ctx, reason=str(exc))
        return None


@dataclass
class CompiledContext:
    path: Path
    placement: Placement
    key: str
    cached: bool


def _versions() -> str:
    import onnxruntime_qnn
    return f"ort={ort.__version__};qnn={getattr(onnxruntime_qnn, '__version__', '?')}"


def content_hash(model_path: str | Path, target: str, provider_options: dict | None = None,
                 disable_cpu_fallback: bool = True) -> str:
    model_path = Path(model_path)
    h = hash_file(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    for location in sorted({d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}):
        hash_file(model_path.parent / location, h)
    options = {**TARGETS[target], **{k: str(v) for k, v in (provider_options or {}).items()
                                    if k not in _RUNTIME_ONLY_OPTIONS}}
    h.update(json.dumps({"target": target, "options": options, "versions": _versions(),
                         "no_fallback": disable_cpu_fallback, "lowering": htp_lowering.VERSION},
                        sort_keys=True).encode())
    return h.hexdigest()


def _placement(model_path: Path, ctx_path: Path) -> Placement:
    """NPU nodes = the source graph's nodes minus those the compiled model still runs outside an EPContext."""
    compiled = onnx.load(str(ctx_path), load_external_data=False)
    cpu = sum(1 for n in compiled.graph.node if n.op_type != "EPContext")
    return Placement(max(count_nodes(model_path) - cpu, 0), cpu, "epcontext")


def _rejected_nodes(model_path: Path, backend: str, options: dict) -> list[str]:
    """Compile again with CPU fallback allowed and name the nodes the HTP left to the CPU."""
    try:
        so = qnn_session_options(backend, disable_cpu_fallback=False, provider_options=options)
        compiled = ort.ModelCompiler(so, str(model_path), embed_compiled_data_into_model=True,
                                     graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                                     ).compile_to_bytes()
    except Exception:
        return []
    model = onnx.load_from_string(compiled)
    return [f"{n.name} ({n.op_type})" for n in model.graph.node if n.op_type != "EPContext"]


def compile_context(model_path: str | Path, out_dir: str | Path, target: str = "emulator", *,
                    backend: str = "qnn-emulator", disable_cpu_fallback: bool = True,
                    provider_options: dict | None = None) -> CompiledContext:
    """Compile `model_path` into an EPContext model in `out_dir` for `target`: `<stem>_ctx.onnx` (+ the
    `_qnn.bin` the EP writes beside it, embed mode 0) and `<stem>_ctx.placement.json`."""
    if target not in TARGETS:
        raise QnnCompileError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {**TARGETS[target], **(provider_options or {})}
    try:
        so = qnn_session_options(backend, disable_cpu_fallback=disable_cpu_fallback, provider_options=options)
    except BackendError as exc:
        raise QnnCompileError(str(exc)) from exc
    ctx_path = out_dir / f"{model_path.name.removesuffix('.onnx')}_ctx.onnx"
    started = time.monotonic()
    try:
        source = htp_lowering.lowered_bytes(model_path) or str(model_path)     # what the HTP should compile
        compiler = ort.ModelCompiler(so, source, embed_compiled_data_into_model=False,
                                     graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        compiler.compile_to_file(str(ctx_path))
    except Exception as exc:
        rejected = _rejected_nodes(model_path, backend, options) if disable_cpu_fallback else []
        if rejected:
            raise QnnCompileError(f"{model_path.name} for {target}: {len(rejected)} node(s) not supported on the "
                                  f"HTP: {', '.join(rejected[:8])}{' ...' if len(rejected) > 8 else ''}") from exc
        raise QnnCompileError(f"{model_path.name} for {target}: {exc}") from exc
    placement = _placement(model_path, ctx_path)
    ctx_path.with_suffix(".placement.json").write_text(json.dumps(placement.to_dict()))
    log.info("qnn.compiled", model=model_path.name, target=target, seconds=round(time.monotonic() - started, 2),
             **placement.to_dict())
    return CompiledContext(ctx_path, placement, "", cached=False)


def cached_context(model_path: str | Path, cache_dir: str | Path | None = None, target: str | None = None, *,
                   backend: str = "qnn-emulator", disable_cpu_fallback: bool = True,
                   provider_options: dict | None = None) -> CompiledContext:
    """The context binary of `model_path` for `target` (default: this machine's) from the cache
    (default: this machine's), compiling it under `<cache>/<target>/<stem>.<hash>/` on a miss."""
    target = target or current().target
    if target not in TARGETS:
        raise QnnCompileError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    model_path = Path(model_path)
    key = content_hash(model_path, target, provider_options, disable_cpu_fallback)
    stem = model_path.name.removesuffix(".onnx")
    entry = Path(cache_dir or current().cache_dir) / target / f"{stem}.{key[:16]}"
    ctx_path = entry / f"{stem}_ctx.onnx"
    placement_file = ctx_path.with_suffix(".placement.json")
    if ctx_path.is_file() and placement_file.is_file():
        data = json.loads(placement_file.read_text())
        return CompiledContext(ctx_path, Placement(data["npu"], data["cpu"], data.get("source", "")), key, cached=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    # Compile into a private folder and rename it into place, so concurrent loaders never see half a context.
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=entry.parent))
    try:
        compiled = compile_context(model_path, tmp, target, backend=backend,
                                   disable_cpu_fallback=disable_cpu_fallback, provider_options=provider_options)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not ctx_path.is_file():      # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CompiledContext(ctx_path, compiled.placement, key, cached=False)
