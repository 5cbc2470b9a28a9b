"""The builder's side of QNN context binaries: compile a QDQ model for each SoC target a bundle ships.

The compiler and the content-hash cache belong to the runtime (`service.runtime.qnn_context`: the service
compiles what a bundle does not ship, on the device, into its data directory); the builder calls them.

`python -m service.modelbuild.qnn_compile MODEL.onnx --target sa8295p-v68 --out DIR`
"""
from __future__ import annotations

import argparse
from pathlib import Path

from service.runtime.qnn_context import TARGETS, CompiledContext, QnnCompileError, cached_context, compile_context

__all__ = ["TARGETS", "CompiledContext", "QnnCompileError", "cached_context", "compile_context", "main"]


def main(argv: list[str] | None = None) -> int:
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
