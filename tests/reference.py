"""An independent reference for extrapolation: float64 arithmetic rounded ONCE into the dtype.

Rounding is done by scaling to an integer grid and np.rint (nearest-even), never through a
float32 intermediate (torch's float64 -> bfloat16 cast rounds twice).
"""
from __future__ import annotations

import numpy as np
import torch

# (significand bits incl. hidden, minimum normal exponent, largest finite value)
FORMATS = {
    torch.bfloat16: (8, -126, float(torch.finfo(torch.bfloat16).max)),
    torch.float16: (11, -14, float(torch.finfo(torch.float16).max)),
    torch.float32: (24, -126, float(torch.finfo(torch.float32).max)),
}


def round_once(v: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded to nearest-even into `dtype` (a single rounding)."""
    bits, emin, fmax = FORMATS[dtype]
    v = np.asarray(v, dtype=np.float64)
    _, e = np.frexp(v)                       # v = m * 2**e with 0.5 <= |m| < 1
    q = np.maximum(e - bits, emin - bits + 1)  # exponent of one unit in the last place
    r = np.ldexp(np.rint(np.ldexp(v, -q)), q)
    r = np.where(np.abs(r) > fmax, np.copysign(np.inf, v), r)
    r = np.where(np.isfinite(v), r, v)
    # r is now exactly representable in dtype, so this cast does not round.
    return torch.from_numpy(r).to(dtype)


def reference(aligned: torch.Tensor, sft: torch.Tensor, alpha: float) -> torch.Tensor:
    x1 = aligned.to(torch.float64).numpy()
    x0 = sft.to(torch.float64).numpy()
    return round_once(x1 + alpha * (x1 - x0), aligned.dtype)
