"""An independent reference for extrapolation: the EXACT value rounded once into the dtype.

Most elements: float64 arithmetic, then one rounding (scale to the integer grid and np.rint,
never through float32: torch's float64 -> bfloat16 cast rounds twice). Elements whose float64
value lies within its error bound of a rounding midpoint (near-ties are common: e.g. alpha=0.1
with a delta of ten units) are recomputed with exact rational arithmetic (fractions).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

# (significand bits incl. hidden, minimum normal exponent, largest finite value)
FORMATS = {
    torch.bfloat16: (8, -126, float(torch.finfo(torch.bfloat16).max)),
    torch.float16: (11, -14, float(torch.finfo(torch.float16).max)),
    torch.float32: (24, -126, float(torch.finfo(torch.float32).max)),
}
U = 2.0 ** -53


def _grid(v: np.ndarray, dtype):
    bits, emin, _ = FORMATS[dtype]
    _, e = np.frexp(v)                          # v = m * 2**e with 0.5 <= |m| < 1
    return np.maximum(e - bits, emin - bits + 1)  # exponent of one unit in the last place


def round_once(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded to nearest-even on dtype's grid (returned as exact float64)."""
    _, _, fmax = FORMATS[dtype]
    q = _grid(v, dtype)
    r = np.ldexp(np.rint(np.ldexp(v, -q)), q)
    r = np.where(np.abs(r) > fmax, np.copysign(np.inf, v), r)
    return np.where(np.isfinite(v), r, v)


def round_exact(v: Fraction, dtype: torch.dtype) -> float:
    bits, emin, fmax = FORMATS[dtype]
    if v == 0:
        return 0.0
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2**(e-1) <= a < 2**(e+1)
    while Fraction(2) ** e <= a:
        e += 1
    while Fraction(2) ** (e - 1) > a:
        e -= 1
    q = max(e - bits, emin - bits + 1)
    n = a / Fraction(2) ** q
    whole, rest = divmod(n.numerator, n.denominator)
    if 2 * rest > n.denominator or (2 * rest == n.denominator and whole % 2 == 1):
        whole += 1
    r = float(whole * Fraction(2) ** q) if whole * Fraction(2) ** q <= fmax else float("inf")
    return r if v > 0 else -r


def reference(aligned: torch.Tensor, sft: torch.Tensor, alpha: float) -> torch.Tensor:
    x1 = aligned.to(torch.float64).flatten().numpy()
    x0 = sft.to(torch.float64).flatten().numpy()
    d = alpha * (x1 - x0)
    v = x1 + d
    r = round_once(v, aligned.dtype)
    # Distance from the nearest midpoint vs. a bound on the float64 evaluation error.
    with np.errstate(invalid="ignore", over="ignore"):
        q = _grid(v, aligned.dtype)
        frac = np.ldexp(v, -q) - np.floor(np.ldexp(v, -q))
        distance = np.abs(frac - 0.5) * np.ldexp(1.0, q)
        bound = 8 * U * (np.abs(x1) + np.abs(d)) + 2.0 ** -1070
        # Also every value that may have cancelled to (nearly) zero: its grid is not v's grid.
        near = np.isfinite(v) & ((distance <= bound) | (np.abs(v) <= 4 * bound))
    for i in np.flatnonzero(near):
        exact = Fraction(x1[i]) + Fraction(alpha) * (Fraction(x1[i]) - Fraction(x0[i]))
        r[i] = round_exact(exact, aligned.dtype) if exact != 0 else np.copysign(0.0, v[i])
    # r is now exactly representable in dtype, so this cast does not round.
    return torch.from_numpy(r).to(aligned.dtype).reshape(aligned.shape)
