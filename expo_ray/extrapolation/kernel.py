"""The extrapolation arithmetic: ``x1 + alpha * (x1 - x0)``, correctly rounded, several alphas per read.

For every element and every alpha (a Python float, i.e. float64) the result is the EXACT real
value ``aligned + alpha * (aligned - sft)`` rounded once to nearest, ties to even, into the input
dtype (BF16, F16, F32 or F64). Overflow gives +-inf and subnormals are exact, as IEEE rounding
does. Plain torch/numpy arithmetic does not do this: bf16 arithmetic rounds every step, and a
float64 result cast to bfloat16 goes through float32 and rounds twice.

Edge rules (identical in both backends, bit for bit):

* ``alpha == 0.0`` copies the aligned bits (alpha 0 reproduces the aligned model byte for byte).
* If the exact value is zero, its sign is the sign of the IEEE float64 evaluation of
  ``x1 + alpha * (x1 - x0)``.
* If an input is inf/NaN the result is that float64 evaluation, rounded; NaN outputs are the
  format's canonical quiet NaN.

Arrays hold RAW BITS (``bits_dtype(dtype)``: uint16 for BF16/F16, uint32 for F32, uint64 for F64),
as read from a safetensors file. All alphas are computed from one pass over the inputs.

Backends: the C extension ``expo_ray.extrapolation._kernel`` (vectorized fast path with a rigorous error bound
plus an exact slow path for the few elements near a rounding boundary; releases the GIL), and an
exact pure-NumPy fallback (error-free transformations in float64, round-to-odd, then
nearest-even). Set ``EXPO_RAY_KERNEL=numpy`` or ``=c`` to force one.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

__all__ = ["SUPPORTED", "bits_dtype", "extrapolate_into", "extrapolate", "backend", "round_float64"]

SUPPORTED = ("BF16", "F16", "F32", "F64")

_FMT_CODE = {"BF16": 0, "F16": 1, "F32": 2, "F64": 3}
_BITS = {"BF16": np.dtype(np.uint16), "F16": np.dtype(np.uint16),
         "F32": np.dtype(np.uint32), "F64": np.dtype(np.uint64)}
# precision (significand bits incl. the hidden one), min normal exponent, max exponent (= bias)
_PARAMS = {"BF16": (8, -126, 127), "F16": (11, -14, 15), "F32": (24, -126, 127), "F64": (53, -1022, 1023)}
_NAN = {"BF16": 0x7FC0, "F16": 0x7E00, "F32": 0x7FC00000, "F64": 0x7FF8000000000000}
_INF = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000, "F64": 0x7FF0000000000000}
_SIGN = {"BF16": 15, "F16": 15, "F32": 31, "F64": 63}

_CHUNK = 1 << 16  # elements per NumPy pass: temporaries stay in cache and memory stays bounded


def bits_dtype(dtype: str) -> np.dtype:
    """The unsigned integer dtype holding one element's raw bits for a safetensors dtype code."""
    try:
        return _BITS[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; the kernel handles {', '.join(SUPPORTED)}") from None


# ----------------------------------------------------------------------------------------------
# Exact scalar reference used by the NumPy backend for the rare elements its vector path
# cannot prove (and for extreme alphas): integer arithmetic on dyadic rationals.

def _dyadic(x: float) -> tuple[int, int]:
    """x == n * 2**e exactly."""
    if x == 0.0:
        return 0, 0
    m, e = math.frexp(x)
    return int(m * (1 << 53)), e - 53


def _nonfinite_bits(dtype: str, r: float) -> int:
    if math.isnan(r):
        return _NAN[dtype]
    return _INF[dtype] | ((1 << _SIGN[dtype]) if r < 0 else 0)


def _round_dyadic(dtype: str, n: int, e: int) -> int:
    """Bits of n * 2**e (n != 0) rounded to nearest-even into dtype."""
    prec, emin, emax = _PARAMS[dtype]
    neg, n = n < 0, abs(n)
    top = e + n.bit_length() - 1
    q = max(top, emin) - (prec - 1)
    s = q - e
    if s <= 0:
        m = n << -s
    else:
        m = n >> s
        rest = n - (m << s)
        half = 1 << (s - 1)
        if rest > half or (rest == half and m & 1):
            m += 1
    if m >> prec:
        m >>= 1
        q += 1
    if m >> (prec - 1):
        exp = q + prec - 1
        bits = _INF[dtype] if exp > emax else ((exp + emax) << (prec - 1)) | (m - (1 << (prec - 1)))
    else:
        bits = m
    return bits | ((1 << _SIGN[dtype]) if neg else 0)


def _exact_scalar(dtype: str, x1: float, x0: float, a: float) -> int:
    r64 = x1 + a * (x1 - x0)
    if not (math.isfinite(x1) and math.isfinite(x0)):
        return _nonfinite_bits(dtype, r64)
    (n1, e1), (n0, e0), (na, ea) = _dyadic(x1), _dyadic(x0), _dyadic(a)
    terms = [(n1, e1), (na * n1, ea + e1), (-na * n0, ea + e0)]
    low = min(e for _, e in terms)
    total = sum(n << (e - low) for n, e in terms)
    if total == 0:
        return (1 << _SIGN[dtype]) if math.copysign(1.0, r64) < 0 else 0
    return _round_dyadic(dtype, total, low)


# ----------------------------------------------------------------------------------------------
# NumPy backend

def _decode(dtype: str, raw: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float64)
    if dtype == "F32":
        return raw.view(np.float32).astype(np.float64)
    return raw.view(np.float64)


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _round_odd_to_f32(x: np.ndarray) -> np.ndarray:
    """Bits (uint32) of x rounded to float32 with round-to-odd (x finite float64)."""
    f = x.astype(np.float32)
    back = f.astype(np.float64)
    inexact = back != x
    toward_zero = (inexact & (np.abs(back) > np.abs(x))).astype(np.uint32)
    return (f.view(np.uint32) - toward_zero) | inexact.astype(np.uint32)


def _from_round_odd(dtype: str, ro: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even into dtype, given x rounded to odd in 53 bits (x = ro for F64)."""
    if dtype == "F64":
        return ro.view(np.uint64)
    if dtype == "F32":
        return ro.astype(np.float32).view(np.uint32)
    u = _round_odd_to_f32(ro)  # RO53 -> RO24 keeps the information RN needs (24 >= 11 + 2)
    if dtype == "F16":
        return u.view(np.float32).astype(np.float16).view(np.uint16)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _numpy_chunk(dtype: str, r1: np.ndarray, r0: np.ndarray, alphas: Sequence[float], outs) -> None:
    x1, x0 = _decode(dtype, r1), _decode(dtype, r0)
    finite = np.isfinite(x1) & np.isfinite(x0)
    dh, dl = _two_sum(x1, -x0)  # x1 - x0 = dh + dl exactly
    ok_elem = finite & (dl == 0)
    if dtype == "F64":  # keep the error-free products away from underflow and overflow
        for x in (x1, x0):
            ax = np.abs(x)
            ok_elem &= (ax <= 2.0**600) & ((ax == 0) | (ax >= 2.0**-600))
    c = 134217729.0 * dh  # Veltkamp split: dh = dhh + dhl, 26 + 27 bits
    dhh = c - (c - dh)
    dhl = dh - dhh
    for a, out in zip(alphas, outs):
        if a == 0.0:
            out[:] = r1
            continue
        c = 134217729.0 * a
        ah = c - (c - a)
        al = a - ah
        ph = a * dh
        pl = ((ah * dhh - ph) + ah * dhl + al * dhh) + al * dhl  # Dekker: a*dh = ph + pl exactly
        th, tl = _two_sum(x1, ph)  # th is also the IEEE float64 evaluation x1 + a*(x1 - x0)
        uh, ul = _two_sum(tl, pl)
        vh, vl = _two_sum(th, uh)
        wh = vl + ul  # exact value v = vh + (vl + ul); wh = RN(vl + ul) has its sign
        # Guard |vl + ul| < ulp(vh)/2 (F64, below a power of two: ulp(vh)/4). It proves
        # F64: vh = RN53(v); others: vh, or its odd neighbour towards v, is v rounded to odd.
        vb = vh.view(np.uint64)
        expf = (vb >> np.uint64(52)) & np.uint64(0x7FF)
        h = ((expf - np.uint64(53)) << np.uint64(52)).view(np.float64)  # ulp(vh)/2 if expf > 53
        nz = wh != 0
        opposite = nz & ((wh.view(np.uint64) ^ vb) >> np.uint64(63)).astype(bool)
        if dtype == "F64":
            h = np.where(opposite & ((vb & np.uint64(0xFFFFFFFFFFFFF)) == 0), 0.5 * h, h)
        ok = ok_elem & (~nz | ((expf > 53) & (np.abs(wh) < h)))
        if dtype == "F64":  # ul == 0: v = th + uh exactly and vh = RN(th + uh), ties included
            ok |= ok_elem & (ul == 0)
        if not 2.0**-300 <= abs(a) <= 2.0**300:  # products could under/overflow: exact path
            ok[:] = False
        if dtype == "F64":
            ro = vh
        else:
            ro = ((vb - opposite.astype(np.uint64)) | nz.astype(np.uint64)).view(np.float64)
        zero = np.flatnonzero(vh == 0)  # the exact value is 0: the sign of the IEEE evaluation
        if len(zero):
            ro[zero] = np.copysign(0.0, th[zero])
        res = _from_round_odd(dtype, ro)
        special = ~finite
        if special.any():  # th is inf or NaN there
            ts = th[special]
            nan, pinf, ninf = (np.array(b, dtype=res.dtype)
                               for b in (_NAN[dtype], _INF[dtype], _INF[dtype] | (1 << _SIGN[dtype])))
            res[special] = np.where(np.isnan(ts), nan, np.where(ts < 0, ninf, pinf))
        out[:] = res
        for i in np.flatnonzero(finite & ~ok):
            out[i] = _exact_scalar(dtype, float(x1[i]), float(x0[i]), a)


def _numpy_extrapolate_into(dtype: str, aligned: np.ndarray, sft: np.ndarray,
                            alphas: Sequence[float], outs: Sequence[np.ndarray]) -> None:
    with np.errstate(all="ignore"):
        for start in range(0, len(aligned), _CHUNK):
            stop = min(start + _CHUNK, len(aligned))
            # copies, so that outputs may alias the inputs
            r1, r0 = aligned[start:stop].copy(), sft[start:stop].copy()
            _numpy_chunk(dtype, r1, r0, alphas, [o[start:stop] for o in outs])


# ----------------------------------------------------------------------------------------------
# backend selection

try:
    from . import _kernel as _ckernel
    _C_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built (no compiler) -> the NumPy kernel, same results
    _ckernel = None
    _C_IMPORT_ERROR = exc


def _c_extrapolate_into(dtype, aligned, sft, alphas, outs) -> None:
    if _ckernel is None:
        raise ImportError(f"the C kernel expo_ray.extrapolation._kernel is not built ({_C_IMPORT_ERROR})")
    _ckernel.extrapolate_into(_FMT_CODE[dtype], aligned, sft, alphas, outs)


def _choose_backend() -> str:
    forced = os.environ.get("EXPO_RAY_KERNEL", "").strip().lower()
    if forced in ("", "auto"):
        return "c" if _ckernel is not None else "numpy"
    if forced == "numpy":
        return "numpy"
    if forced == "c":
        if _ckernel is None:
            raise ImportError(
                "EXPO_RAY_KERNEL=c but the C kernel expo_ray.extrapolation._kernel is not importable "
                f"({_C_IMPORT_ERROR}); build it with `python setup.py build_ext --inplace` "
                "(needs a C compiler) or unset EXPO_RAY_KERNEL to use the NumPy kernel")
        return "c"
    raise ImportError(f"EXPO_RAY_KERNEL={forced!r} is not one of: c, numpy, auto")


_BACKEND = _choose_backend()
_IMPL = {"c": _c_extrapolate_into, "numpy": _numpy_extrapolate_into}


def backend() -> str:
    """The backend in use: "c" (the compiled extension) or "numpy" (the exact fallback)."""
    return _BACKEND


def fallback_warning() -> str | None:
    """One line to show when this process uses the NumPy kernel without being asked to: what it
    costs and how to get the C kernel (None when the C kernel is in use, or NumPy was forced)."""
    if _BACKEND == "c" or os.environ.get("EXPO_RAY_KERNEL", "").strip().lower() == "numpy":
        return None
    return ("the C kernel (expo_ray.extrapolation._kernel) is not built here, so extrapolation uses the exact "
            "NumPy kernel: same bits, about 35x slower arithmetic (60 ns against 1.6 ns per element and alpha; "
            "a 1.9 GB pair with 5 alphas took 79 s instead of 23 s); reinstall expo-ray with a C compiler "
            "present (pip install -e .) or run `python setup.py build_ext --inplace` in a checkout")


def _check(dtype: str, aligned, sft, alphas, outs) -> list[float]:
    bits = bits_dtype(dtype)
    for name, arr in (("aligned", aligned), ("sft", sft)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != bits or not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be a 1-D C-contiguous {bits} array of raw {dtype} bits")
    if len(aligned) != len(sft):
        raise ValueError(f"aligned and sft differ in length ({len(aligned)} != {len(sft)})")
    alphas = [float(a) for a in alphas]
    if not all(math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be finite, got {alphas}")
    if len(outs) != len(alphas):
        raise ValueError(f"need one output array per alpha ({len(alphas)}), got {len(outs)}")
    for out in outs:
        if (not isinstance(out, np.ndarray) or out.ndim != 1 or out.dtype != bits
                or not out.flags.c_contiguous or not out.flags.writeable or len(out) != len(aligned)):
            raise ValueError(f"every output must be a writable 1-D C-contiguous {bits} array "
                             f"of length {len(aligned)}")
    return alphas


def extrapolate_into(dtype: str, aligned: np.ndarray, sft: np.ndarray, alphas: Sequence[float],
                     outs: Sequence[np.ndarray]) -> None:
    """Write round_nearest_even(aligned + alpha * (aligned - sft)) into outs[i] for each alphas[i].

    All arrays are raw bits of ``dtype`` (see ``bits_dtype``), 1-D, C-contiguous, same length.
    An output may be one of the inputs itself (in place) but must not partially overlap one.
    """
    alphas = _check(dtype, aligned, sft, alphas, outs)
    if len(aligned) and alphas:
        _IMPL[_BACKEND](dtype, aligned, sft, alphas, list(outs))


def round_float64(dtype: str, values: np.ndarray) -> np.ndarray:
    """Raw bits of float64 ``values`` rounded once, to nearest-even, into ``dtype`` (a float64 cast
    to bfloat16 through float32 would round twice). Non-finite values stay non-finite."""
    x = np.ascontiguousarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        return _from_round_odd(dtype, x).copy()


def extrapolate(dtype: str, aligned: np.ndarray, sft: np.ndarray, alphas: Sequence[float]) -> list[np.ndarray]:
    """Like ``extrapolate_into`` but allocates and returns one output array per alpha."""
    outs = [np.empty(len(aligned), dtype=bits_dtype(dtype)) for _ in alphas]
    extrapolate_into(dtype, aligned, sft, alphas, outs)
    return outs
