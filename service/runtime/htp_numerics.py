"""The QNN HTP's requantization multiplier, as measured on the bit-faithful emulator: shared by the build's exact
scales (modelbuild/htp_requant.py) and the run-time lowering (htp_matmul.py)."""
from __future__ import annotations

import numpy as np

MULTIPLIER_BITS = 11          # significant bits of the HTP's requantization multiplier (fp16 mantissa + 1)


def htp_multiplier(m: np.ndarray) -> np.ndarray:
    """`m` rounded to the HTP's multiplier precision (11 significant bits, exponent unbounded: a multiplier
    below fp16's normal range keeps its 11 bits too, measured)."""
    mant, exp = np.frexp(np.asarray(m, np.float64))
    return np.ldexp(np.rint(mant * 2.0 ** MULTIPLIER_BITS) / 2.0 ** MULTIPLIER_BITS, exp)
