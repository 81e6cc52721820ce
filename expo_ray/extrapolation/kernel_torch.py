"""The extrapolation arithmetic on torch tensors, on any device (a GPU when the engine has one),
with the same result bits as :mod:`expo_ray.extrapolation.kernel`.

The NumPy backend's algorithm, step for step, in float64 torch operations (each one rounded by
itself: eager torch does not contract a*b + c into a fused multiply-add): error-free
transformations give the exact value as an unevaluated sum, which is rounded to odd in 53 bits
and then to nearest-even in the target format. The few elements whose rounding the vector path
cannot prove are recomputed exactly on the host (``kernel._exact_scalar``). Tensors hold raw
bits: int16 for BF16/F16, int32 for F32, int64 for F64 (torch's signed views of the same bytes).
"""
from __future__ import annotations

import torch

from . import kernel
from .kernel import _two_sum  # plain arithmetic: the same on arrays and tensors

_VIEW = {"BF16": torch.int16, "F16": torch.int16, "F32": torch.int32, "F64": torch.int64}
_FLOAT = {"F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _decode(dtype: str, raw: torch.Tensor) -> torch.Tensor:
    if dtype == "BF16":
        return ((raw.to(torch.int32) & 0xFFFF) << 16).view(torch.float32).to(torch.float64)
    return raw.view(_FLOAT[dtype]).to(torch.float64)


def _round_odd_to_f32(x: torch.Tensor) -> torch.Tensor:
    """Bits (int32) of x rounded to float32 with round-to-odd (x finite float64)."""
    f = x.to(torch.float32)
    back = f.to(torch.float64)
    inexact = back != x
    toward_zero = (inexact & (back.abs() > x.abs())).to(torch.int32)
    return (f.view(torch.int32) - toward_zero) | inexact.to(torch.int32)


def _from_round_odd(dtype: str, ro: torch.Tensor) -> torch.Tensor:
    if dtype == "F64":
        return ro.view(torch.int64)
    if dtype == "F32":
        return ro.to(torch.float32).view(torch.int32)
    u = _round_odd_to_f32(ro)
    if dtype == "F16":
        return u.view(torch.float32).to(torch.float16).view(torch.int16)
    u = u.to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16)


def _signed(value: int, dtype: str) -> int:
    bits = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64}[dtype]
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def extrapolate(dtype: str, aligned: torch.Tensor, sft: torch.Tensor, alpha: float) -> torch.Tensor:
    """Raw bits of round_nearest_even(aligned + alpha * (aligned - sft)) in ``dtype``, on the
    inputs' device; ``aligned`` and ``sft`` are raw bits (see the module docstring)."""
    view = _VIEW[dtype]
    r1, r0 = aligned.reshape(-1).view(view), sft.reshape(-1).view(view)
    a = float(alpha)
    if a == 0.0:
        return r1.clone()
    x1, x0 = _decode(dtype, r1), _decode(dtype, r0)
    finite = torch.isfinite(x1) & torch.isfinite(x0)
    dh, dl = _two_sum(x1, -x0)
    ok_elem = finite & (dl == 0)
    if dtype == "F64":
        for x in (x1, x0):
            ax = x.abs()
            ok_elem &= (ax <= 2.0**600) & ((ax == 0) | (ax >= 2.0**-600))
    c = 134217729.0 * dh
    dhh = c - (c - dh)
    dhl = dh - dhh
    c = 134217729.0 * a
    ah = c - (c - a)
    al = a - ah
    ph = a * dh
    pl = ((ah * dhh - ph) + ah * dhl + al * dhh) + al * dhl
    th, tl = _two_sum(x1, ph)
    uh, ul = _two_sum(tl, pl)
    vh, vl = _two_sum(th, uh)
    wh = vl + ul
    vb = vh.view(torch.int64)
    expf = (vb >> 52) & 0x7FF
    h = ((expf - 53) << 52).view(torch.float64)
    nz = wh != 0
    opposite = nz & ((wh.view(torch.int64) ^ vb) < 0)
    if dtype == "F64":
        h = torch.where(opposite & ((vb & 0xFFFFFFFFFFFFF) == 0), 0.5 * h, h)
    ok = ok_elem & (~nz | ((expf > 53) & (wh.abs() < h)))
    if dtype == "F64":
        ok |= ok_elem & (ul == 0)
    if not 2.0**-300 <= abs(a) <= 2.0**300:
        ok = torch.zeros_like(ok)
    ro = vh if dtype == "F64" else ((vb - opposite.to(torch.int64)) | nz.to(torch.int64)).view(torch.float64)
    ro = torch.where(vh == 0, torch.copysign(torch.zeros_like(th), th), ro)
    res = _from_round_odd(dtype, ro)
    special = ~finite
    if bool(special.any()):
        nan, pinf = _signed(kernel._NAN[dtype], dtype), _signed(kernel._INF[dtype], dtype)
        ninf = _signed(kernel._INF[dtype] | (1 << kernel._SIGN[dtype]), dtype)
        filled = torch.where(torch.isnan(th), torch.full_like(res, nan), torch.where(th < 0, torch.full_like(res, ninf),
                                                                                        torch.full_like(res, pinf)))
        res = torch.where(special, filled, res)
    slow = torch.nonzero(finite & ~ok).flatten()
    if len(slow):  # rare: exact integer arithmetic on the host
        p1, p0 = x1[slow].cpu().tolist(), x0[slow].cpu().tolist()
        exact = [_signed(kernel._exact_scalar(dtype, u, v, a), dtype) for u, v in zip(p1, p0)]
        res[slow] = torch.tensor(exact, dtype=res.dtype).to(res.device)
    return res
