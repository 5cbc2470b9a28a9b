"""QNN context binaries (EPContext models) per target, cached by content hash.

`compile_context` writes `<out_dir>/<stem>_ctx.onnx` (+ the `_qnn.bin` the EP writes beside it, embed mode 0)
and `<stem>_ctx.placement.json` (nodes placed on the NPU / left on the CPU). `cached_context` does the same
under `<cache>/<target>/<stem>.<hash>/` once per content hash: the hash covers the model and its external
data, the target's provider options and the onnxruntime / onnxruntime-qnn versions, so any change recompiles.

Facts this relies on (shared/qnn-notes.md): `ort.ModelCompiler` needs ORT_ENABLE_BASIC (with optimizations
off, unfolded shape sub-graphs land on the CPU and the compile fails); the default target is already v68;
`soc_model=39` selects SA8295P (v68, 8 MB VTCM). The emulator does not check the architecture, so a context
that loads here proves nothing about a device: build for the car's target and test there.
"""
from __future__ import annotations

import hashlib
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

from service.runtime.backends import BackendError, Placement, count_nodes, qnn_session_options

log = structlog.get_logger(__name__)

TARGETS: dict[str, dict[str, str]] = {
    "emulator": {},                                 # the emulator's default (v68)
    "sa8295p-v68": {"soc_model": "39"},             # SA8295P cockpit SoC, Hexagon v68
}
# Options that change only how a context runs, not what is compiled.
_RUNTIME_ONLY_OPTIONS = {"htp_performance_mode", "backend_path", "profiling_level", "profiling_file_path"}


class QnnCompileError(RuntimeError):
    pass


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
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    model = onnx.load(str(model_path), load_external_data=False)
    for location in sorted({d.value for t in model.graph.initializer for d in t.external_data if d.key == "location"}):
        with open(model_path.parent / location, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    options = {**TARGETS[target], **{k: str(v) for k, v in (provider_options or {}).items()
                                    if k not in _RUNTIME_ONLY_OPTIONS}}
    h.update(json.dumps({"target": target, "options": options, "versions": _versions(),
                         "no_fallback": disable_cpu_fallback}, sort_keys=True).encode())
    return h.hexdigest()


def _placement(model_path: Path, ctx_path: Path) -> Placement:
    """NPU nodes = the source graph's nodes minus those the compiled model still runs outside an EPContext."""
    compiled = onnx.load(str(ctx_path), load_external_data=False)
    cpu = sum(1 for n in compiled.graph.node if n.op_type != "EPContext")
    total = count_nodes(model_path)
    return Placement(max(total - cpu, 0), cpu, "epcontext")


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
    """Compile `model_path` into an EPContext model in `out_dir` for `target`."""
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
        compiler = ort.ModelCompiler(so, str(model_path), embed_compiled_data_into_model=False,
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


def cached_context(model_path: str | Path, cache_dir: str | Path, target: str = "emulator", *,
                   backend: str = "qnn-emulator", disable_cpu_fallback: bool = True,
                   provider_options: dict | None = None) -> CompiledContext:
    """The context binary of `model_path` for `target` from the cache, compiling it on a miss."""
    if target not in TARGETS:
        raise QnnCompileError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    model_path = Path(model_path)
    key = content_hash(model_path, target, provider_options, disable_cpu_fallback)
    stem = model_path.name.removesuffix(".onnx")
    entry = Path(cache_dir) / target / f"{stem}.{key[:16]}"
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


def main(argv: list[str] | None = None) -> int:
    """`python -m service.modelbuild.qnn_compile MODEL.onnx --target sa8295p-v68 --out DIR`"""
    import argparse
    ap = argparse.ArgumentParser(description="Compile a QDQ ONNX model into a QNN context binary (EPContext).")
    ap.add_argument("model")
    ap.add_argument("--target", action="append", choices=list(TARGETS), help="repeatable; default: all targets")
    ap.add_argument("--out", required=True, help="output folder; one subfolder per target")
    ap.add_argument("--allow-cpu-fallback", action="store_true", help="keep nodes the HTP rejects on the CPU")
    args = ap.parse_args(argv)
    for target in args.target or list(TARGETS):
        try:
            compiled = compile_context(args.model, Path(args.out) / target, target,
                                       disable_cpu_fallback=not args.allow_cpu_fallback)
        except QnnCompileError as exc:
            print(f"error: {exc}")
            return 1
        print(f"{target}: {compiled.path} (npu nodes {compiled.placement.npu}, cpu nodes {compiled.placement.cpu})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
