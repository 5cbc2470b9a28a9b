"""CMake flags for building llama-cpp-python from source on this CPU (`make bench` uses them).

The registry's prebuilt wheel and GGML_NATIVE=ON both pick AMX kernels when /proc/cpuinfo advertises AMX, and AMX
dies with SIGILL in sandboxes that do not enable it; so native detection stays off and each SIMD level is turned on
only when the CPU says it has it. AMX is never turned on for the same reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

# GGML option -> the /proc/cpuinfo flags it needs (all of them).
_GGML_OPTIONS = {
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX_VNNI": ("avx_vnni",),
}


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(flags: set[str]) -> str:
    options = ["-DGGML_NATIVE=OFF"]
    for option, needed in _GGML_OPTIONS.items():
        options.append(f"-D{option}={'ON' if all(f in flags for f in needed) else 'OFF'}")
    return " ".join(options)


def main() -> int:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_flags(cpuinfo.read_text()) if cpuinfo.exists() else set()
    print(cmake_args(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
