"""Non-finite values: inputs holding NaN or Inf are refused (unless allowed), and so is an alpha
that turns finite inputs into Inf (the result exceeds the dtype's range).

Checked chunk by chunk as the data streams through, with two read-only reductions: the largest
magnitude of each input chunk (NaN or Inf if any value is non-finite) bounds every result,
|a + alpha*(a - s)| <= |a| + |alpha|*(|a| + |s|), so outputs are only scanned when that bound
comes near the dtype's range.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ExpoError

LARGEST = {"BF16": 3.3895313892515355e38, "F16": 65504.0, "F32": 3.4028234663852886e38, "F64": 1.7976931348623157e308}
# (unsigned view, signed view, exponent bits): a value is NaN or Inf exactly when all its exponent bits are set.
EXPONENT = {"BF16": (np.uint16, np.int16, 0x7F80), "F16": (np.uint16, np.int16, 0x7C00),
            "F32": (np.uint32, np.int32, 0x7F800000), "F64": (np.uint64, np.int64, 0x7FF0000000000000)}


def _decode(bits: int, dtype: str) -> float:
    if dtype == "BF16":
        return float(np.array([bits << 16], np.uint32).view(np.float32)[0])
    unsigned = EXPONENT[dtype][0]
    return float(np.array([bits], unsigned).view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])[0])


def largest_magnitude(data, dtype: str) -> float:
    """max |x| over a chunk of raw little-endian values; NaN when any value is non-finite.

    Floats are sign-magnitude: as signed integers the largest non-negative one is the largest
    positive value; as unsigned integers the largest is the largest negative one (if any)."""
    unsigned, signed, exponent = EXPONENT[dtype]
    bits = np.frombuffer(memoryview(data).cast("B"), unsigned)
    if not len(bits):
        return 0.0
    sign = 1 << (8 * bits.itemsize - 1)
    positive, top = int(bits.view(signed).max()), int(bits.max())
    magnitude = max(positive, top - sign if top >= sign else 0)
    return math.nan if magnitude >= exponent else _decode(magnitude, dtype)


def nonfinite_mask(data, dtype: str) -> np.ndarray:
    view, _, exponent = EXPONENT[dtype]
    bits = data.view(view) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=view)
    return (bits & view(exponent)) == view(exponent)


def check_chunk(tensor: str, dtype: str, aligned, sft, alphas: list[float], labels: list[str], outputs,
                allow_nonfinite: bool) -> None:
    """Refuse non-finite inputs (unless allowed) and any alpha whose result overflows to Inf.
    `outputs` (one per alpha) may be None when nothing was computed."""
    if dtype not in LARGEST:
        return
    extent = {"aligned": largest_magnitude(aligned, dtype),
              "sft": 0.0 if sft is None else largest_magnitude(sft, dtype)}
    for role, value in extent.items():
        if not math.isfinite(value) and not allow_nonfinite:
            raise ExpoError(f"tensor {tensor} ({dtype}) of the {role} model holds NaN or Inf values; refused "
                            "(--allow-nonfinite extrapolates anyway, keeping them non-finite)")
    if outputs is None:
        return
    for alpha, label, out in zip(alphas, labels, outputs):
        bound = extent["aligned"] + abs(alpha) * (extent["aligned"] + extent["sft"])
        if bound * (1 + 2 ** -6) < LARGEST[dtype]:
            continue  # no result can reach Inf (NaN bounds are never below: they fall through)
        bad = nonfinite_mask(out, dtype)
        if not bad.any():
            continue
        if allow_nonfinite:  # only values the inputs did not already carry count
            n = 0 if sft is None else len(sft) // np.dtype(EXPONENT[dtype][0]).itemsize
            inherited = nonfinite_mask(aligned, dtype)
            inherited[:n] |= nonfinite_mask(sft, dtype)
            bad &= ~inherited
            if not bad.any():
                continue
        raise ExpoError(f"tensor {tensor} ({dtype}): alpha {label} overflows, turning finite weights into Inf "
                        f"({int(bad.sum())} value(s) in one chunk exceed the range of {dtype}); use a smaller alpha or "
                        "scale")
