"""The extrapolation kernel against an independent exact reference (fractions.Fraction).

Every case runs the NumPy backend explicitly and the C backend when it is built, and compares
both bit for bit with the reference: the exact rational x1 + alpha*(x1 - x0) rounded once to
nearest-even by integer arithmetic.
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from expo_ray.extrapolation import kernel

# ----------------------------------------------------------------------------------------------
# independent reference

# exponent bits, stored fraction bits
LAYOUT = {"BF16": (8, 7), "F16": (5, 10), "F32": (8, 23), "F64": (11, 52)}


def _fields(dtype):
    eb, mb = LAYOUT[dtype]
    bias = (1 << (eb - 1)) - 1
    return eb, mb, bias


def to_fraction(dtype, bits):
    """Decode raw bits: a Fraction, or the float inf/-inf/nan."""
    eb, mb, bias = _fields(dtype)
    sign = -1 if (bits >> (eb + mb)) & 1 else 1
    exp = (bits >> mb) & ((1 << eb) - 1)
    man = bits & ((1 << mb) - 1)
    if exp == (1 << eb) - 1:
        return float("nan") if man else sign * float("inf")
    if exp == 0:
        return sign * Fraction(man) * Fraction(2) ** (1 - bias - mb)
    return sign * Fraction((1 << mb) | man) * Fraction(2) ** (exp - bias - mb)


def to_float(dtype, bits):
    v = to_fraction(dtype, bits)
    if isinstance(v, float):
        return v
    eb, mb, _ = _fields(dtype)
    return math.copysign(float(v), -1.0 if bits >> (eb + mb) else 1.0)  # exact; keeps -0.0


def round_fraction(dtype, q, negative_zero):
    """Bits of the rational q rounded to nearest, ties to even (integer arithmetic only)."""
    eb, mb, bias = _fields(dtype)
    sign_bit = 1 << (eb + mb)
    if q == 0:
        return sign_bit if negative_zero else 0
    sign = sign_bit if q < 0 else 0
    q = abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()  # 2**e <= q < 2**(e+2)
    while Fraction(2) ** (e + 1) <= q:
        e += 1
    while Fraction(2) ** e > q:
        e -= 1
    e = max(e, 1 - bias)  # subnormals share the smallest normal exponent's quantum
    scaled = q / Fraction(2) ** (e - mb)
    n = scaled.numerator // scaled.denominator
    rest = scaled - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1):
        n += 1
    if n == 1 << (mb + 1):
        n >>= 1
        e += 1
    if e > bias:  # overflow
        return sign | (((1 << eb) - 1) << mb)
    if n < 1 << mb:  # subnormal (or rounded to zero)
        return sign | n
    return sign | ((e + bias) << mb) | (n - (1 << mb))


def reference(dtype, b1, b0, alpha):
    """Expected bits, or None where any NaN is acceptable."""
    if alpha == 0.0:
        return b1
    x1, x0 = to_fraction(dtype, b1), to_fraction(dtype, b0)
    f1, f0 = to_float(dtype, b1), to_float(dtype, b0)
    r64 = f1 + alpha * (f1 - f0)  # the IEEE float64 evaluation (specials, sign of zero)
    if isinstance(x1, float) or isinstance(x0, float):
        if math.isnan(r64):
            return None
        eb, mb, _ = _fields(dtype)  # r64 is +-inf
        return ((1 << (eb + mb)) if r64 < 0 else 0) | (((1 << eb) - 1) << mb)
    q = x1 + Fraction(alpha) * (x1 - x0)
    return round_fraction(dtype, q, math.copysign(1.0, r64) < 0)


def is_nan_bits(dtype, bits):
    eb, mb, _ = _fields(dtype)
    return ((bits >> mb) & ((1 << eb) - 1)) == (1 << eb) - 1 and (bits & ((1 << mb) - 1)) != 0


# ----------------------------------------------------------------------------------------------
# backends

BACKENDS = ["numpy", "c", "torch"]
C_MISSING = None if kernel._ckernel is not None else (
    f"C extension expo_ray.extrapolation._kernel is not built ({kernel._C_IMPORT_ERROR}); "
    "run `python setup.py build_ext --inplace` to test it")


def run(backend, dtype, a1, a0, alphas):
    if backend == "c" and C_MISSING:
        pytest.skip(C_MISSING)
    outs = [np.full(len(a1), 0x5A5A5A5A5A5A5A5A & np.iinfo(a1.dtype).max, dtype=a1.dtype) for _ in alphas]
    kernel._check(dtype, a1, a0, alphas, outs)
    impl = {"numpy": kernel._numpy_extrapolate_into, "c": kernel._c_extrapolate_into, "torch": _torch_into}[backend]
    if len(a1) and alphas:
        impl(dtype, a1, a0, [float(a) for a in alphas], outs)
    return outs


def _torch_into(dtype, a1, a0, alphas, outs):
    """expo_ray.extrapolation.kernel_torch on CPU tensors (the computation a GPU engine would run on its device)."""
    from expo_ray.extrapolation import kernel_torch

    signed = {2: np.int16, 4: np.int32, 8: np.int64}[a1.itemsize]
    t1, t0 = torch.from_numpy(a1.view(signed).copy()), torch.from_numpy(a0.view(signed).copy())
    for alpha, out in zip(alphas, outs):
        out[:] = kernel_torch.extrapolate(dtype, t1, t0, alpha).numpy().view(a1.dtype)


@functools.lru_cache(maxsize=256)
def expected(dtype, raw1, raw0, alpha):
    """Reference bits for whole arrays (cached: every backend is checked against the same)."""
    bits = kernel.bits_dtype(dtype)
    a1, a0 = np.frombuffer(raw1, dtype=bits).tolist(), np.frombuffer(raw0, dtype=bits).tolist()
    return [reference(dtype, b1, b0, alpha) for b1, b0 in zip(a1, a0)]


def check_exact(backend, dtype, a1, a0, alphas):
    outs = run(backend, dtype, a1, a0, alphas)
    for alpha, out in zip(alphas, outs):
        bad = []
        wants = expected(dtype, a1.tobytes(), a0.tobytes(), float(alpha))
        for i, (b1, b0, got, want) in enumerate(zip(a1.tolist(), a0.tolist(), out.tolist(), wants)):
            ok = is_nan_bits(dtype, got) if want is None else got == want
            if not ok:
                bad.append((i, hex(b1), hex(b0), hex(got), None if want is None else hex(want)))
        assert not bad, f"{backend} {dtype} alpha={alpha}: {len(bad)} wrong, first: {bad[:5]}"
    return outs


# ----------------------------------------------------------------------------------------------
# data

def bits_of(dtype, values):
    """Raw bits of float64 values converted into dtype (plain conversions; only data generation)."""
    v = np.asarray(values, dtype=np.float64)
    if dtype == "BF16":
        return (torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
                .view(np.uint16).copy())
    if dtype == "F16":
        return v.astype(np.float16).view(np.uint16)
    if dtype == "F32":
        return v.astype(np.float32).view(np.uint32)
    return v.copy().view(np.uint64)


def random_finite_bits(dtype, n, rng):
    eb, mb, _ = _fields(dtype)
    bits = rng.integers(0, 1 << (1 + eb + mb), size=n, dtype=np.uint64)
    exp = (bits >> np.uint64(mb)) & np.uint64((1 << eb) - 1)
    bits = np.where(exp == (1 << eb) - 1, bits ^ np.uint64(1 << mb), bits)  # no inf/NaN
    return bits.astype(kernel.bits_dtype(dtype))


FORMATS = ["BF16", "F16", "F32", "F64"]
N = {"BF16": 1500, "F16": 1500, "F32": 1500, "F64": 700}
SCALE = {"BF16": 0.02, "F16": 0.02, "F32": 0.02, "F64": 0.02}


def dpo_like(dtype, n, rng):
    """A fine-tuned weight and its SFT weight: normal-ish values, small deltas."""
    x0 = rng.standard_normal(n) * SCALE[dtype]
    x1 = x0 + rng.standard_normal(n) * SCALE[dtype] * 0.05
    return bits_of(dtype, x1), bits_of(dtype, x0)


def tie_heavy(dtype, n, rng):
    """Neighbouring values: with dyadic alphas the exact result is often exactly a midpoint."""
    x0 = rng.standard_normal(n) * SCALE[dtype]
    b0 = bits_of(dtype, x0)
    b1 = (b0.astype(np.int64) + rng.integers(-3, 4, n)).astype(b0.dtype)
    return b1, b0


def cancelling(dtype, n, rng, alpha):
    """x1 + alpha*(x1 - x0) ~ 0: x0 ~ x1 * (1 + 1/alpha), so the result is tiny or exactly zero."""
    x1 = rng.standard_normal(n) * SCALE[dtype]
    x0 = x1 * (1 + 1 / alpha)
    b0 = bits_of(dtype, x0)
    b0 = (b0.astype(np.int64) + rng.integers(-1, 2, n)).astype(b0.dtype)
    return bits_of(dtype, x1), b0


def specials(dtype):
    """Every pair of interesting values: zeros, subnormals, extremes, inf, NaN."""
    info = {"BF16": torch.finfo(torch.bfloat16), "F16": torch.finfo(torch.float16),
            "F32": torch.finfo(torch.float32), "F64": torch.finfo(torch.float64)}[dtype]
    tiny, sub, big = info.tiny, info.smallest_normal * info.eps, info.max
    vals = [0.0, -0.0, sub, -sub, 3 * sub, tiny, -tiny, tiny * 1.5, big, -big, big / 2, 1.0, -1.0,
            0.1, 3.0, 1e-3, float("inf"), float("-inf")]
    b = list(bits_of(dtype, vals)) + [_nan_bits(dtype, quiet=True), _nan_bits(dtype, quiet=False)]
    a1 = np.array([x for x in b for _ in b], dtype=kernel.bits_dtype(dtype))
    a0 = np.array([y for _ in b for y in b], dtype=kernel.bits_dtype(dtype))
    return a1, a0


def _nan_bits(dtype, quiet):
    eb, mb, _ = _fields(dtype)
    return (((1 << eb) - 1) << mb) | ((1 << (mb - 1)) if quiet else 1) | (1 << (eb + mb))  # negative NaN


# ----------------------------------------------------------------------------------------------
# tests

@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "c" and C_MISSING:
        pytest.skip(C_MISSING)
    return request.param


@pytest.mark.parametrize("dtype", FORMATS)
def test_dpo_like_weights(backend, dtype):
    rng = np.random.default_rng(1)
    a1, a0 = dpo_like(dtype, N[dtype], rng)
    check_exact(backend, dtype, a1, a0, [0.1, 0.3, 0.5, 25.0, -0.7])


@pytest.mark.parametrize("dtype", FORMATS)
def test_exact_ties_with_dyadic_alphas(backend, dtype):
    rng = np.random.default_rng(2)
    a1, a0 = tie_heavy(dtype, N[dtype], rng)
    alphas = [0.5, 0.25, 1.0, 2.0, 3.0, -0.5]
    check_exact(backend, dtype, a1, a0, alphas)
    # the case really is full of ties: count exact midpoints for alpha 0.5
    ties = 0
    for b1, b0 in zip(a1.tolist()[:300], a0.tolist()[:300]):
        q = to_fraction(dtype, b1) + Fraction(1, 2) * (to_fraction(dtype, b1) - to_fraction(dtype, b0))
        down, up = round_fraction(dtype, q, False), round_fraction(dtype, q + q * Fraction(1, 2**80), False)
        ties += q != 0 and down != up and to_fraction(dtype, down) != q
    assert ties > 30


@pytest.mark.parametrize("dtype", FORMATS)
def test_random_bit_patterns(backend, dtype):
    """All exponents: big gaps between x1 and x0, subnormals, values near the max (overflow)."""
    rng = np.random.default_rng(3)
    n = N[dtype] // 2
    a1, a0 = random_finite_bits(dtype, n, rng), random_finite_bits(dtype, n, rng)
    check_exact(backend, dtype, a1, a0, [0.1, 0.5, 2.0, -3.0, 25.0])


@pytest.mark.parametrize("dtype", FORMATS)
def test_subnormals(backend, dtype):
    rng = np.random.default_rng(4)
    eb, mb, _ = _fields(dtype)
    n = 600
    a1 = rng.integers(0, 1 << (mb + 2), n).astype(kernel.bits_dtype(dtype))  # subnormals, smallest normals
    a0 = rng.integers(0, 1 << (mb + 2), n).astype(kernel.bits_dtype(dtype))
    a0 |= (rng.integers(0, 2, n).astype(a0.dtype) << a0.dtype.type(eb + mb))  # mixed signs
    check_exact(backend, dtype, a1, a0, [0.1, 0.5, -0.5, 1.0, 25.0, 3e-5])


@pytest.mark.parametrize("dtype", FORMATS)
def test_heavy_cancellation_and_exact_zeros(backend, dtype):
    rng = np.random.default_rng(5)
    for alpha in (0.5, 0.1, -2.0, 3.0):
        a1, a0 = cancelling(dtype, 400, rng, alpha)
        check_exact(backend, dtype, a1, a0, [alpha])


@pytest.mark.parametrize("dtype", FORMATS)
def test_special_values(backend, dtype):
    a1, a0 = specials(dtype)
    check_exact(backend, dtype, a1, a0, [0.1, 0.5, -1.0, 2.0, 25.0, -0.3, 1e-30])


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_extreme_alphas(backend, dtype):
    rng = np.random.default_rng(6)
    a1, a0 = dpo_like(dtype, 300, rng)
    check_exact(backend, dtype, a1, a0, [2.0**-200, -(2.0**-120), 1e-40, 2.0**150, 1e200, 100.0])


@pytest.mark.parametrize("dtype", FORMATS)
def test_alpha_zero_is_a_byte_copy(backend, dtype):
    a1, a0 = specials(dtype)
    out = run(backend, dtype, a1, a0, [0.0, -0.0])
    assert out[0].tobytes() == a1.tobytes() and out[1].tobytes() == a1.tobytes()


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("n", [0, 1, 3, 17, 1023, 1025, 2049])
def test_lengths_and_vector_tails(backend, dtype, n):
    rng = np.random.default_rng(7 + n)
    a1, a0 = dpo_like(dtype, n, rng)
    alphas = [0.5, 0.3]
    outs = run(backend, dtype, a1, a0, alphas)
    assert all(len(o) == n for o in outs)
    if n <= 1025:
        check_exact(backend, dtype, a1, a0, alphas)
    else:
        other = run("numpy", dtype, a1, a0, alphas)
        assert all(np.array_equal(o, p) for o, p in zip(outs, other))


@pytest.mark.parametrize("dtype", FORMATS)
def test_many_alphas_in_one_call_equal_separate_calls(backend, dtype):
    rng = np.random.default_rng(8)
    a1, a0 = dpo_like(dtype, 5000, rng)
    alphas = [0.1, 0.2, 0.0, 0.5, 25.0, -1.0]
    together = run(backend, dtype, a1, a0, alphas)
    for alpha, out in zip(alphas, together):
        assert np.array_equal(out, run(backend, dtype, a1, a0, [alpha])[0])


@pytest.mark.parametrize("dtype", FORMATS)
def test_backends_agree_bit_for_bit_on_a_large_chunk(dtype):
    if C_MISSING:
        pytest.skip(C_MISSING)
    rng = np.random.default_rng(9)
    n = 200_000 if dtype != "F64" else 50_000
    a1, a0 = dpo_like(dtype, n, rng)
    a1[::97] = random_finite_bits(dtype, len(a1[::97]), rng)  # a sprinkling of wild values
    s1, s0 = specials(dtype)
    a1, a0 = np.concatenate([a1, s1]), np.concatenate([a0, s0])
    alphas = [0.1, 0.25, 0.5, 2.0, -0.6, 25.0]
    c, npy = run("c", dtype, a1, a0, alphas), run("numpy", dtype, a1, a0, alphas)
    for alpha, x, y in zip(alphas, c, npy):
        assert np.array_equal(x, y), f"alpha={alpha}: {(x != y).sum()} elements differ"


def test_in_place_output(backend):
    rng = np.random.default_rng(10)
    a1, a0 = dpo_like("BF16", 3000, rng)
    want = run(backend, "BF16", a1, a0, [0.5])[0]
    impl = kernel._numpy_extrapolate_into if backend == "numpy" else kernel._c_extrapolate_into
    impl("BF16", a1, a0, [0.5], [a1])
    assert np.array_equal(a1, want)


def test_torch_float64_to_bfloat16_rounds_twice():
    """Why the kernel exists: torch's float64 -> bf16 goes through float32 and can be wrong."""
    x1 = torch.tensor([1.0], dtype=torch.bfloat16)
    x0 = torch.tensor([1.0 - 2**-8], dtype=torch.bfloat16)
    alpha = 1.0 + 2**-24  # exact value 1 + 2**-8 + 2**-32: just above the bf16 midpoint 1 + 2**-8
    naive = (x1.double() + alpha * (x1.double() - x0.double())).to(torch.bfloat16)
    b1 = x1.view(torch.int16).numpy().view(np.uint16)
    b0 = x0.view(torch.int16).numpy().view(np.uint16)
    right = reference("BF16", int(b1[0]), int(b0[0]), alpha)
    assert right == 0x3F81  # 1.0078125
    assert int(naive.view(torch.int16).numpy().view(np.uint16)[0]) != right  # torch gives 1.0
    assert int(kernel.extrapolate("BF16", b1.copy(), b0.copy(), [alpha])[0][0]) == right


def test_torch_is_wrong_on_tie_cases_the_kernel_gets_right():
    rng = np.random.default_rng(11)
    a1, a0 = tie_heavy("BF16", 4000, rng)
    alpha = 0.5 + 2**-30
    ours = kernel.extrapolate("BF16", a1, a0, [alpha])[0]
    t1 = torch.from_numpy(a1.view(np.int16)).view(torch.bfloat16).double()
    t0 = torch.from_numpy(a0.view(np.int16)).view(torch.bfloat16).double()
    naive = (t1 + alpha * (t1 - t0)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    wrong = np.flatnonzero(naive != ours)
    assert len(wrong) > 10
    for i in wrong[:20]:
        assert int(ours[i]) == reference("BF16", int(a1[i]), int(a0[i]), alpha)


# ----------------------------------------------------------------------------------------------
# API

def test_api_validation():
    a = np.zeros(4, dtype=np.uint16)
    with pytest.raises(ValueError, match="unsupported dtype"):
        kernel.bits_dtype("I8")
    with pytest.raises(ValueError, match="length"):
        kernel.extrapolate("BF16", a, np.zeros(3, dtype=np.uint16), [0.5])
    with pytest.raises(ValueError, match="raw BF16 bits"):
        kernel.extrapolate("BF16", a.astype(np.uint32), a.astype(np.uint32), [0.5])
    with pytest.raises(ValueError, match="finite"):
        kernel.extrapolate("BF16", a, a, [float("nan")])
    with pytest.raises(ValueError, match="one output array per alpha"):
        kernel.extrapolate_into("BF16", a, a, [0.1, 0.2], [a.copy()])
    with pytest.raises(ValueError, match="writable"):
        ro = a.copy()
        ro.flags.writeable = False
        kernel.extrapolate_into("BF16", a, a, [0.1], [ro])
    assert kernel.bits_dtype("F32") == np.uint32 and kernel.bits_dtype("F64") == np.uint64
    assert kernel.backend() in ("c", "numpy")
    assert kernel.extrapolate("F16", a, a, []) == []


def test_read_only_inputs_are_fine():
    data = np.arange(100, dtype=np.uint16).tobytes()
    a1 = np.frombuffer(data, dtype=np.uint16)  # read-only, as from a file read
    out = kernel.extrapolate("BF16", a1, a1, [0.5])[0]
    assert np.array_equal(out, a1)


def _backend_in_subprocess(env_value, hide_c=False, show="kernel.backend()"):
    code = ("import sys\n"
            + ("sys.modules['expo_ray.extrapolation._kernel'] = None\n" if hide_c else "")
            + f"from expo_ray.extrapolation import kernel\nprint({show})\n")
    env = dict(os.environ, EXPO_RAY_KERNEL=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(kernel.__file__).resolve().parents[2])


def test_env_var_forces_backend():
    res = _backend_in_subprocess("numpy")
    assert res.returncode == 0 and res.stdout.strip() == "numpy", res.stderr
    res = _backend_in_subprocess("c", hide_c=True)
    assert res.returncode != 0 and "ImportError" in res.stderr and "EXPO_RAY_KERNEL=c" in res.stderr
    res = _backend_in_subprocess("", hide_c=True)
    assert res.returncode == 0 and res.stdout.strip() == "numpy", res.stderr
    if not C_MISSING:
        res = _backend_in_subprocess("c")
        assert res.returncode == 0 and res.stdout.strip() == "c", res.stderr


def test_the_numpy_fallback_says_what_it_costs_unless_asked_for():
    res = _backend_in_subprocess("", hide_c=True, show="kernel.fallback_warning()")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert "NumPy kernel" in line and "35x slower" in line and "C compiler" in line and "\n" not in line
    res = _backend_in_subprocess("numpy", hide_c=True, show="kernel.fallback_warning()")
    assert res.stdout.strip() == "None", "a NumPy kernel the user asked for needs no warning"
    if not C_MISSING:
        assert _backend_in_subprocess("", show="kernel.fallback_warning()").stdout.strip() == "None"


def test_c_kernel_releases_the_gil():
    if C_MISSING:
        pytest.skip(C_MISSING)
    n = 1 << 22
    a1 = np.full(n, 0x3F80, dtype=np.uint16)
    a0 = np.full(n, 0x3F00, dtype=np.uint16)
    outs = [np.empty(n, dtype=np.uint16) for _ in range(4)]
    started, done = threading.Event(), threading.Event()

    def work():
        started.set()
        for _ in range(5):
            kernel._c_extrapolate_into("BF16", a1, a0, [0.1, 0.2, 0.3, 0.4], outs)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    ticks = 0
    while not done.is_set():  # runs only when the worker does not hold the GIL
        ticks += 1
        time.sleep(0.0005)
    t.join()
    assert ticks > 20, ticks


@pytest.mark.parametrize("dtype", FORMATS)
def test_alpha_minus_one_gives_the_sft_model_across_exponent_gaps(backend, dtype):
    """alpha = -1: x1 - (x1 - x0) = x0 exactly, however far apart x1 and x0 are (catastrophic
    cancellation of large terms); also -1 +- tiny, where x0 is nearly recovered."""
    rng = np.random.default_rng(12)
    n = 600
    eb, mb, _ = _fields(dtype)
    def pack(sign, exp, man):
        return ((sign.astype(np.uint64) << np.uint64(eb + mb)) | (exp.astype(np.uint64) << np.uint64(mb))
                | man.astype(np.uint64)).astype(kernel.bits_dtype(dtype))

    top = (1 << eb) - 2  # largest finite exponent field
    big = pack(rng.integers(0, 2, n), rng.integers(top - 8, top + 1, n), rng.integers(0, 1 << mb, n))
    small = pack(rng.integers(0, 2, n), rng.integers(0, min(top, 40), n), rng.integers(0, 1 << mb, n))
    a1 = np.concatenate([big, small, big])
    a0 = np.concatenate([small, big, big[::-1]])
    out = run(backend, dtype, a1, a0, [-1.0])[0]
    nonzero = (a0 & kernel.bits_dtype(dtype).type((1 << (eb + mb)) - 1)) != 0
    assert np.array_equal(out[nonzero], a0[nonzero])
    check_exact(backend, dtype, a1, a0, [-1.0, -1.0 + 2.0**-40, -1.0 - 2.0**-20])


@pytest.mark.parametrize("dtype", FORMATS)
def test_exact_scalar_paths_match_reference(dtype):
    """The big-integer slow path of the C kernel and the NumPy kernel's integer fallback, on
    their own (the vector paths send them only a few elements)."""
    rng = np.random.default_rng(13)
    a1 = np.concatenate([random_finite_bits(dtype, 300, rng), specials(dtype)[0][::7]])
    a0 = np.concatenate([random_finite_bits(dtype, 300, rng), specials(dtype)[1][::7]])
    for alpha in (0.1, 0.5, -1.0, 25.0, 2.0**-600, 3e250):
        for b1, b0 in zip(a1.tolist(), a0.tolist()):
            want = reference(dtype, b1, b0, alpha)
            x1, x0 = to_float(dtype, b1), to_float(dtype, b0)
            got = [kernel._exact_scalar(dtype, x1, x0, alpha)]
            if not C_MISSING:
                got.append(kernel._ckernel.exact_scalar(kernel._FMT_CODE[dtype], x1, x0, alpha))
            for g in got:
                assert (is_nan_bits(dtype, g) if want is None else g == want), (hex(b1), hex(b0), alpha, hex(g))


def test_c_kernel_ignores_flush_to_zero_mode():
    """torch.set_flush_denormal(True) sets FTZ/DAZ for the thread; the C kernel clears them."""
    if C_MISSING:
        pytest.skip(C_MISSING)
    rng = np.random.default_rng(14)
    a1 = rng.integers(0, 1 << 9, 500).astype(np.uint16)  # bf16 subnormals and tiny normals
    a0 = rng.integers(0, 1 << 9, 500).astype(np.uint16)
    want = run("numpy", "BF16", a1, a0, [0.3, 0.5])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = run("c", "BF16", a1, a0, [0.3, 0.5])
    finally:
        torch.set_flush_denormal(False)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", FORMATS)
def test_large_calls_equal_small_calls(dtype):
    """Large calls store their outputs differently (non-temporal stores); outputs that are not
    16-byte aligned included."""
    if C_MISSING:
        pytest.skip(C_MISSING)
    rng = np.random.default_rng(15)
    n = (3 << 20) // kernel.bits_dtype(dtype).itemsize + 3
    a1, a0 = dpo_like(dtype, n, rng)
    alphas = [0.1, 0.0, 0.5, 25.0]
    big = [np.empty(n + 1, dtype=a1.dtype)[1:] for _ in alphas]  # misaligned by one element
    kernel._c_extrapolate_into(dtype, a1, a0, alphas, big)
    step = 40_000
    for s in range(0, n, step):
        small = run("c", dtype, a1[s:s + step], a0[s:s + step], alphas)
        assert all(np.array_equal(b[s:s + step], o) for b, o in zip(big, small)), s


_COMPACTION_CODE = """
import hashlib, numpy as np
from expo_ray.extrapolation import kernel
rng = np.random.default_rng(16)
h = hashlib.sha256()
for dtype in ("BF16", "F16"):
    x0 = rng.standard_normal(100_003).astype(np.float32) * 0.02
    x1 = x0 + rng.standard_normal(100_003).astype(np.float32) * 0.001
    a1 = x1.astype(np.float16).view(np.uint16) if dtype == "F16" else (x1.view(np.uint32) >> 16).astype(np.uint16)
    a0 = x0.astype(np.float16).view(np.uint16) if dtype == "F16" else (x0.view(np.uint32) >> 16).astype(np.uint16)
    for out in kernel.extrapolate(dtype, a1, a0, [0.1, 0.3, 0.5, 25.0]):
        h.update(out.tobytes())
print(h.hexdigest())
"""


def test_vector_and_portable_flag_compaction_agree():
    """The C kernel gathers the elements tier 1 cannot prove with AVX2 where the CPU has it;
    the portable gathering (forced by EXPO_RAY_KERNEL_NO_AVX2) must give the same bits."""
    if C_MISSING:
        pytest.skip(C_MISSING)
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(kernel.__file__)))
    digests = []
    for flag in ("", "1"):
        env = dict(os.environ, EXPO_RAY_KERNEL="c", EXPO_RAY_KERNEL_NO_AVX2=flag)
        if not flag:
            env.pop("EXPO_RAY_KERNEL_NO_AVX2")
        res = subprocess.run([sys.executable, "-c", _COMPACTION_CODE], env=env, capture_output=True,
                             text=True, cwd=cwd, timeout=300)
        assert res.returncode == 0, res.stderr
        digests.append(res.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64
