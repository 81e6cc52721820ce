/*
 * expo_ray._kernel -- the correctly rounded ExPO extrapolation kernel (C backend).
 *
 * For every element and every alpha a (a float64) the output is the exact real value
 *     v = x1 + a * (x1 - x0)        (x1 = aligned, x0 = sft)
 * rounded ONCE to nearest, ties to even, into the input format (BF16, F16, F32 or F64).
 * Inputs and outputs are raw bits. The inputs are read once per block of BLK elements and
 * every alpha's output is written from that block (outputs may alias the inputs).
 *
 * Three tiers; each element takes the first that can PROVE its result:
 *
 *  Tier 1 (vectorized, every element). BF16/F16 in float32, F32 in float64:
 *      d = x1 - x0,  p = a*d,  r = x1 + p             (float32: a rounded to a32 = (float)a)
 *    Error bound. float32, u = 2^-24: with a32 = a(1+e_a), fl(d) = d(1+e1),
 *    fl(p) = a32 fl(d) (1+e2) + eta (|eta| <= 2^-150, underflow), r = (x1 + fl(p))(1+e3):
 *      |r - v| <= 1.0000001 u|r| + 3.0000005 u|p| + 1.0001 * 2^-150
 *             <  B = fma(|r| + |p|, 2^-22, 2^-148)    (also covers B's own rounding and, where
 *                                                       lo/hi are formed, that of r -/+ B)
 *    and float64 (a exact, no underflow for |a| >= 2^-800): B = fma(|r|+|p|, 2^-51, 2^-1070).
 *    Rounding to nearest is monotone, so if no rounding boundary (a midpoint between two
 *    neighbours of the output format) lies within B of r, RN(v) = RN(r).
 *      BF16/F16: the boundaries are the float32 values whose dropped low bits (16 / 13) are
 *      100...0; the nearest one outside r's binade is >= 2^11 ulp32(r) away. For
 *      |r| >= 2^-120 and |p| <= c|r|, B < (4 (1 + c) + 0.04) ulp32(r), so "dropped bits more
 *      than K = 4 (1 + c) + 1 away from 100...0" (c = 1 or 256) proves it; else flagged.
 *      F32: fl(r - B) and fl(r + B) converted to float must give the same bits.
 *    Exact ties (frequent with dyadic alphas: 0.5, 0.25, 2) always sit on a boundary, so when a
 *    is exact in the working precision the loop also proves per element that d, p and r are
 *    exact (TwoSum error 0, fma product error 0, no underflow), and x1 == x0 is always exact;
 *    then r = v and RN(r) is the answer, ties included.
 *    Also flagged: non-finite r, inexact zero results (their sign), F16 results outside the
 *    normal range.
 *  Tier 2 (flagged elements, gathered -- with AVX2 movemask where the CPU has it, since a
 *    per-element scan costs as much as tier 1 itself -- and vectorized in float64). Recompute the tier-1 bracket
 *    [fl(r - B), fl(r + B)] and round both ends: equal -> done; adjacent values rl < rh -> the
 *    boundary is m = (rl + rh)/2, and the sign of v - m = (x1 - m) + a*d is found exactly with
 *    TwoSum / fma TwoProduct (every step checked exact). Near-ties that no float64 evaluation
 *    resolves (alpha = 0.1 or 0.3 put ~9% of bf16 results within 2^-54 of a midpoint) end here.
 *  Tier 3 (rare: wide exponent gaps, zeros of unknown sign, specials, extreme alphas):
 *    exact_generic() sums the exact terms x1 + a*x1 - a*x0 (each a <= 106-bit integer times a
 *    power of two) in a fixed-point big integer and rounds by integer arithmetic.
 *  F64: an error-free double-double evaluation with a guard that proves the leading double is
 *    RN(v) (chain_f64), else tier 3.
 *
 * Special cases: alpha == 0 copies the aligned bits. If the exact value is zero its sign is
 * the sign of the IEEE float64 evaluation of x1 + a*(x1 - x0). If an input is inf/NaN the
 * result is that float64 evaluation, rounded; every NaN output is the format's canonical quiet
 * NaN (positive, no payload) so the C and NumPy backends agree bit for bit.
 *
 * The GIL is released while computing. Rounding mode is forced to nearest and FTZ/DAZ are
 * cleared for the duration of a call (and restored afterwards). Built with -ffp-contract=off:
 * every fma is explicit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <fenv.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#include <immintrin.h>
#define EXPO_HAVE_MXCSR 1
#define EXPO_HAVE_STREAM 1
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && __GNUC__ >= 11 \
    && !defined(EXPO_NO_CLONES)
#define KCLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define EXPO_CLONES_DESC "target_clones(x86-64-v4, x86-64-v3, default)"
#else
#define KCLONES
#define EXPO_CLONES_DESC "no target clones (baseline ISA)"
#endif

#if defined(__GNUC__)
#define KINLINE static inline __attribute__((always_inline))
#else
#define KINLINE static inline
#endif

#define BLK 1024

enum { FMT_BF16 = 0, FMT_F16 = 1, FMT_F32 = 2, FMT_F64 = 3 };

typedef struct {
    int prec;   /* significand bits including the hidden bit */
    int emin;   /* exponent of the smallest normal number */
    int emax;   /* exponent of the largest finite number (also the exponent bias) */
    int ebits;  /* exponent field width */
    uint64_t nan, inf;
} fmt_t;

static const fmt_t FMT[4] = {
    {8, -126, 127, 8, 0x7FC0u, 0x7F80u},
    {11, -14, 15, 5, 0x7E00u, 0x7C00u},
    {24, -126, 127, 8, 0x7FC00000u, 0x7F800000u},
    {53, -1022, 1023, 11, 0x7FF8000000000000ull, 0x7FF0000000000000ull},
};

/* ------------------------------------------------------------------------------------ */
/* bit casts and format conversions                                                      */

KINLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KINLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
KINLINE uint64_t d2u(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }
KINLINE double u2d(uint64_t u) { double f; memcpy(&f, &u, 8); return f; }

/* IEEE half bits -> float32 (exact, branch free). */
KINLINE float f16_to_f32(uint32_t h)
{
    uint32_t sign = (h & 0x8000u) << 16;
    uint32_t em = h & 0x7FFFu;
    uint32_t normal = (em << 13) + (112u << 23);
    uint32_t infnan = (em << 13) | 0x7F800000u;
    uint32_t sub = f2u((float)(int32_t)em * 0x1p-24f);
    uint32_t m_inf = 0u - (uint32_t)(em >= 0x7C00u), m_sub = 0u - (uint32_t)(em < 0x400u);
    uint32_t r = (infnan & m_inf) | (sub & m_sub) | (normal & ~(m_inf | m_sub));
    return u2f(r | sign);
}

/* finite IEEE half bits -> float64 (exact, branch free; garbage for inf/NaN) */
KINLINE double f16_to_f64_finite(uint32_t h)
{
    uint64_t sign = (uint64_t)(h & 0x8000u) << 48;
    uint64_t ex = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint64_t normal = ((ex + 1008u) << 52) | (man << 42); /* 1023 - 15 = 1008 */
    uint64_t sub = d2u((double)(int32_t)man * 0x1p-24); /* int32: AVX2 converts those */
    uint64_t m_sub = (uint64_t)0 - (uint64_t)(ex == 0);
    return u2d((sub & m_sub) | (normal & ~m_sub) | sign);
}

/* float32 -> IEEE half bits, round to nearest even (branch free; after F. Giesen). */
KINLINE uint32_t f32_to_f16_rne(float f)
{
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    uint32_t o_big = 0x7C00u | ((uint32_t)(a > 0x7F800000u) << 9); /* inf, or a quiet NaN */
    uint32_t o_sub = f2u(u2f(a) + 0.5f) - 0x3F000000u; /* subnormal: the FP add rounds */
    uint32_t o_norm = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    /* selections by bit masks: a conditional FP add would block vectorization */
    uint32_t m_big = 0u - (uint32_t)(a >= 0x47800000u);
    uint32_t m_sub = 0u - (uint32_t)(a < 0x38800000u);
    uint32_t o = (o_big & m_big) | (o_sub & m_sub) | (o_norm & ~(m_big | m_sub));
    return o | sign;
}

/* float32 -> bfloat16 bits, round to nearest even (not for NaN). */
KINLINE uint32_t f32_to_bf16_rne(float f)
{
    uint32_t u = f2u(f);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}


static uint64_t encode_nonfinite(int fmt, double r)
{
    const fmt_t *F = &FMT[fmt];
    if (isnan(r))
        return F->nan;
    return F->inf | ((uint64_t)(signbit(r) ? 1 : 0) << (F->prec - 1 + F->ebits));
}

/* ------------------------------------------------------------------------------------ */
/* exact slow path: fixed-point big integer                                              */

#define NLIMB 72

typedef unsigned __int128 u128;

static void decompose(double y, int *neg, uint64_t *m, int *e)
{
    uint64_t b = d2u(y);
    int E = (int)((b >> 52) & 0x7FF);
    *neg = (int)(b >> 63);
    *m = b & ((1ull << 52) - 1);
    if (E == 0) {
        *e = -1074;
    } else {
        *m |= 1ull << 52;
        *e = E - 1075;
    }
}

static void add_shifted(uint64_t *acc, int nl, int neg, u128 mag, int sh)
{
    int k = sh >> 6, b = sh & 63, i;
    uint64_t lo = (uint64_t)mag, hi = (uint64_t)(mag >> 64), w[3];
    if (b == 0) {
        w[0] = lo; w[1] = hi; w[2] = 0;
    } else {
        w[0] = lo << b;
        w[1] = (lo >> (64 - b)) | (hi << b);
        w[2] = hi >> (64 - b);
    }
    if (!neg) {
        uint64_t carry = 0;
        for (i = 0; i < 3; i++) {
            uint64_t s = acc[k + i] + w[i];
            uint64_t c1 = s < w[i];
            uint64_t s2 = s + carry;
            uint64_t c2 = s2 < carry;
            acc[k + i] = s2;
            carry = c1 | c2;
        }
        for (i = k + 3; carry && i < nl; i++) {
            acc[i] += 1;
            carry = acc[i] == 0;
        }
    } else {
        uint64_t borrow = 0;
        for (i = 0; i < 3; i++) {
            uint64_t x = acc[k + i];
            uint64_t s = x - w[i];
            uint64_t b1 = x < w[i];
            uint64_t s2 = s - borrow;
            uint64_t b2 = s < borrow;
            acc[k + i] = s2;
            borrow = b1 | b2;
        }
        for (i = k + 3; borrow && i < nl; i++) {
            borrow = acc[i] == 0;
            acc[i] -= 1;
        }
    }
}

static uint64_t get_bits(const uint64_t *acc, int nl, int pos, int cnt)
{
    int k = pos >> 6, b = pos & 63;
    uint64_t v;
    if (cnt <= 0)
        return 0;
    v = acc[k] >> b;
    if (b && k + 1 < nl)
        v |= acc[k + 1] << (64 - b);
    if (cnt < 64)
        v &= (1ull << cnt) - 1;
    return v;
}

static int any_below(const uint64_t *acc, int pos)
{
    int k = pos >> 6, b = pos & 63, i;
    for (i = 0; i < k; i++)
        if (acc[i])
            return 1;
    return b ? (acc[k] & ((1ull << b) - 1)) != 0 : 0;
}

/* The exact value x1 + a*(x1 - x0) rounded once to nearest-even into fmt. a is finite. */
static uint64_t exact_generic(int fmt, double x1, double x0, double a)
{
    const fmt_t *F = &FMT[fmt];
    const int ss = F->prec - 1 + F->ebits;
    double d = x1 - x0;
    double p = a * d;
    double r64 = x1 + p; /* IEEE float64 evaluation: gives specials and the sign of a zero */
    struct { int neg; u128 mag; int e; } t[3];
    int nt = 0, n1, n0, na, e1, e0, ea, L, H, nl, i, top, neg, k, E, Q, s;
    uint64_t m1, m0, ma, M, bits, acc[NLIMB];

    if (!isfinite(x1) || !isfinite(x0))
        return encode_nonfinite(fmt, r64); /* r64 is inf or NaN here */

    decompose(x1, &n1, &m1, &e1);
    decompose(x0, &n0, &m0, &e0);
    decompose(a, &na, &ma, &ea);
    if (m1) {
        t[nt].neg = n1; t[nt].mag = m1; t[nt].e = e1; nt++;
        if (ma) {
            t[nt].neg = n1 ^ na; t[nt].mag = (u128)ma * m1; t[nt].e = ea + e1; nt++;
        }
    }
    if (ma && m0) {
        t[nt].neg = !(n0 ^ na); t[nt].mag = (u128)ma * m0; t[nt].e = ea + e0; nt++;
    }
    if (nt == 0)
        return (uint64_t)(signbit(r64) ? 1 : 0) << ss;

    L = t[0].e; H = t[0].e;
    for (i = 1; i < nt; i++) {
        if (t[i].e < L) L = t[i].e;
        if (t[i].e > H) H = t[i].e;
    }
    nl = ((H + 128 - L) >> 6) + 2; /* <= 67: H - L <= 4090 */
    memset(acc, 0, (size_t)nl * sizeof(uint64_t));
    for (i = 0; i < nt; i++)
        add_shifted(acc, nl, t[i].neg, t[i].mag, t[i].e - L);

    neg = (int)(acc[nl - 1] >> 63);
    if (neg) { /* two's complement negate */
        uint64_t carry = 1;
        for (i = 0; i < nl; i++) {
            acc[i] = ~acc[i] + carry;
            carry = carry && acc[i] == 0;
        }
    }
    for (top = nl - 1; top >= 0 && acc[top] == 0; top--)
        ;
    if (top < 0) /* the exact value is zero */
        return (uint64_t)(signbit(r64) ? 1 : 0) << ss;

    k = top * 64 + 63 - __builtin_clzll(acc[top]); /* index of the leading bit */
    E = k + L;                                        /* value in [2^E, 2^(E+1)) */
    Q = (E < F->emin ? F->emin : E) - (F->prec - 1);  /* exponent of the last place */
    s = Q - L;
    if (s <= 0) {
        M = acc[0] << (-s); /* exact: fewer than prec bits */
    } else {
        int rb;
        M = get_bits(acc, nl, s, k - s + 1);
        rb = (s - 1 <= k) ? (int)((acc[(s - 1) >> 6] >> ((s - 1) & 63)) & 1) : 0;
        if (rb && ((M & 1) || any_below(acc, s - 1)))
            M++;
    }
    if (M >> F->prec) {
        M >>= 1;
        Q++;
    }
    if (M >> (F->prec - 1)) {
        int e = Q + F->prec - 1;
        if (e > F->emax)
            bits = F->inf;
        else
            bits = ((uint64_t)(e + F->emax) << (F->prec - 1)) | (M & ((1ull << (F->prec - 1)) - 1));
    } else {
        bits = M; /* subnormal or zero */
    }
    return bits | ((uint64_t)neg << ss);
}

/* ------------------------------------------------------------------------------------ */
/* fast paths                                                                            */

/* BF16 / F16: per block, load once: x1 and d = x1 - x0 in float32, and whether d is exact. */
KINLINE void prep_half_impl(int fmt, const uint16_t *restrict r1, const uint16_t *restrict r0, int n,
                            float *restrict X1, float *restrict X0, float *restrict D,
                            uint32_t *restrict DEX)
{
    int i;
    for (i = 0; i < n; i++) {
        float x1 = fmt == FMT_BF16 ? u2f((uint32_t)r1[i] << 16) : f16_to_f32(r1[i]);
        float x0 = fmt == FMT_BF16 ? u2f((uint32_t)r0[i] << 16) : f16_to_f32(r0[i]);
        float nx0 = -x0;
        float s = x1 + nx0;
        float bb = s - x1;
        float err = (x1 - (s - bb)) + (nx0 - bb); /* TwoSum: x1 - x0 = s + err exactly */
        X1[i] = x1;
        X0[i] = x0;
        D[i] = s;
        DEX[i] = err == 0.0f ? 0xFFFFFFFFu : 0u;
    }
}

KCLONES static void prep_half(int fmt, const uint16_t *restrict r1, const uint16_t *restrict r0, int n,
                              float *restrict X1, float *restrict X0, float *restrict D,
                              uint32_t *restrict DEX)
{
    if (fmt == FMT_BF16)
        prep_half_impl(FMT_BF16, r1, r0, n, X1, X0, D, DEX);
    else
        prep_half_impl(FMT_F16, r1, r0, n, X1, X0, D, DEX);
}

KINLINE uint32_t alpha_half_impl(int fmt, int check, const float *restrict X1, const float *restrict D,
                                 const uint32_t *restrict DEX, int n, float a, uint16_t *restrict out,
                                 uint16_t *restrict flag)
{
    uint32_t any = 0;
    int i;
    for (i = 0; i < n; i++) {
        float x1 = X1[i], d = D[i];
        float p = a * d;
        float r = x1 + p;
        uint32_t ex, bad;
        if (check) { /* were d, p and r computed exactly? (a is exact in float32 here) */
            float pe = fmaf(a, d, -p);
            float bb = r - x1;
            float re = (x1 - (r - bb)) + (p - bb);
            uint32_t ok = (pe == 0.0f) & (re == 0.0f) & ((fabsf(p) >= FLT_MIN) | (d == 0.0f));
            ex = DEX[i] & (0u - ok);
        } else { /* x1 == x0: p = +-0 and r = x1 exactly (unchanged weights are common) */
            ex = 0u - (uint32_t)(d == 0.0f);
        }
        /* Tier-1 test. B = fma(|r| + |p|, 2^-22, 2^-148) bounds |r - v| (see the header); in
         * units of ulp32(r), for |r| >= 2^-120 and |p| <= c |r|: B < 4 (1 + c) + 0.04 =: K.
         * The rounding boundaries (midpoints between neighbours in the output format) are the
         * float32 values whose dropped low bits (16 for BF16, 13 for F16) are 100...0, and from
         * r the nearest one outside r's binade is >= 2^11 ulps away. So if the dropped bits of
         * r are more than K away from 100...0, no boundary lies within B of r: RN(v) = RN(r).
         * Exact lanes (ex) are rounded directly. */
        {
            uint32_t ur = f2u(r), ar = ur & 0x7FFFFFFFu;
            float fr = fabsf(r), fp = fabsf(p), fr256 = 256.0f * fr;
            int32_t c1 = 0 - (int32_t)(fp <= fr), c2 = 0 - (int32_t)(fp <= fr256);
            int32_t K = (9 & c1) | (1029 & ~c1 & c2) | (INT32_MAX & ~c2); /* c = 1, 256, else flag */
            if (fmt == FMT_BF16) {
                int32_t dist = abs((int32_t)(ur & 0xFFFFu) - 0x8000);
                uint32_t inrange = ((int32_t)ar >= 0x03800000) & ((int32_t)ar < 0x7F800000);
                bad = ((dist <= K) | (inrange == 0)) & (ex == 0);
                out[i] = (uint16_t)f32_to_bf16_rne(r);
            } else {
                /* F16: the cheap rounding is valid in the normal range [2^-14, 2^16) only; the
                 * rest is flagged, except an exact zero (kept with its sign) */
                int32_t dist = abs((int32_t)(ur & 0x1FFFu) - 0x1000);
                uint32_t normal = ((int32_t)ar >= 0x38800000) & ((int32_t)ar < 0x47800000);
                uint32_t exzero = (ex != 0) & (ar == 0);
                uint32_t rh = ((ur >> 16) & 0x8000u) | ((ar + 0xC8000FFFu + ((ar >> 13) & 1u)) >> 13);
                bad = ((dist <= K) & (ex == 0)) | ((normal == 0) & (exzero == 0));
                out[i] = (uint16_t)(exzero ? (ur >> 16) & 0x8000u : rh);
            }
        }
        flag[i] = (uint16_t)bad;
        any |= bad;
    }
    return any;
}

KCLONES static uint32_t alpha_half(int fmt, int check, const float *restrict X1, const float *restrict D,
                                   const uint32_t *restrict DEX, int n, float a, uint16_t *restrict out,
                                   uint16_t *restrict flag)
{
    if (fmt == FMT_BF16)
        return check ? alpha_half_impl(FMT_BF16, 1, X1, D, DEX, n, a, out, flag)
                     : alpha_half_impl(FMT_BF16, 0, X1, D, DEX, n, a, out, flag);
    return check ? alpha_half_impl(FMT_F16, 1, X1, D, DEX, n, a, out, flag)
                 : alpha_half_impl(FMT_F16, 0, X1, D, DEX, n, a, out, flag);
}

/* F32: the same scheme in float64. */
KCLONES static void prep_f32(const uint32_t *restrict r1, const uint32_t *restrict r0, int n, double *restrict X1,
                             double *restrict X0, double *restrict D, uint64_t *restrict DEX)
{
    int i;
    for (i = 0; i < n; i++) {
        double x1 = (double)u2f(r1[i]), nx0 = -(double)u2f(r0[i]);
        double s = x1 + nx0;
        double bb = s - x1;
        double err = (x1 - (s - bb)) + (nx0 - bb);
        X1[i] = x1;
        X0[i] = -nx0;
        D[i] = s;
        DEX[i] = err == 0.0 ? ~0ull : 0ull;
    }
}

KINLINE uint32_t alpha_f32_impl(int check, const double *restrict X1, const double *restrict D,
                                const uint64_t *restrict DEX, int n, double a, uint32_t *restrict out,
                                uint32_t *restrict flag)
{
    uint32_t any = 0;
    int i;
    for (i = 0; i < n; i++) {
        double x1 = X1[i], d = D[i];
        double p = a * d;
        double r = x1 + p;
        uint64_t ex;
        double B, lo, hi;
        uint32_t rl, rh, bad;
        if (check) {
            double pe = fma(a, d, -p);
            double bb = r - x1;
            double re = (x1 - (r - bb)) + (p - bb);
            uint64_t ok = (pe == 0.0) & (re == 0.0) & ((fabs(p) >= DBL_MIN) | (d == 0.0));
            ex = DEX[i] & (0ull - ok);
        } else { /* x1 == x0: r = x1 exactly */
            ex = 0ull - (uint64_t)(d == 0.0);
        }
        B = fma(fabs(r) + fabs(p), 0x1p-51, 0x1p-1070);
        lo = u2d((d2u(r - B) & ~ex) | (d2u(r) & ex));
        hi = u2d((d2u(r + B) & ~ex) | (d2u(r) & ex));
        rl = f2u((float)lo);
        rh = f2u((float)hi);
        bad = (rl != rh) | !(fabs(r) <= DBL_MAX) | ((ex == 0) & ((rh & 0x7FFFFFFFu) == 0));
        out[i] = rh;
        flag[i] = bad;
        any |= bad;
    }
    return any;
}

KCLONES static uint32_t alpha_f32(int check, const double *restrict X1, const double *restrict D,
                                  const uint64_t *restrict DEX, int n, double a, uint32_t *restrict out,
                                  uint32_t *restrict flag)
{
    return check ? alpha_f32_impl(1, X1, D, DEX, n, a, out, flag)
                 : alpha_f32_impl(0, X1, D, DEX, n, a, out, flag);
}

/* F64: exact evaluation with error-free transformations in float64:
 *     x1 - x0 = d exactly (TwoSum error must be 0),  a*d = ph + pl exactly (fma),
 *     v = x1 + ph + pl = vh + (vl + ul) exactly after three TwoSums; wh = RN(vl + ul).
 * Guard |vl + ul| < ulp(vh)/2 (ulp(vh)/4 when vl + ul < 0 and vh is a power of two), or
 * ul == 0, proves vh = RN(v). th = x1 + fl(a*fl(x1 - x0)) is the IEEE float64 evaluation: the sign of an exact
 * zero. ok[i] = 0 sends the element to the big-integer path: non-finite input, inexact d,
 * |x| outside {0} U [2^-600, 2^600] (the fma product could underflow), failed guard. */
KCLONES static void chain_f64(const double *restrict X1, const double *restrict X0, int n,
                              double a, uint64_t *restrict res, uint8_t *restrict ok)
{
    int i;
    for (i = 0; i < n; i++) {
        double x1 = X1[i], x0 = X0[i], nx0 = -x0, a1 = fabs(x1), a0 = fabs(x0);
        double dh = x1 + nx0, bb, dl, ph, pl, th, tl, uh, ul, vh, vl, wh, h;
        uint64_t vb, expf, nz, opp, zm, good;
        bb = dh - x1; dl = (x1 - (dh - bb)) + (nx0 - bb);
        ph = a * dh;
        pl = fma(a, dh, -ph);
        th = x1 + ph; bb = th - x1; tl = (x1 - (th - bb)) + (ph - bb);
        uh = tl + pl; bb = uh - tl; ul = (tl - (uh - bb)) + (pl - bb);
        vh = th + uh; bb = vh - th; vl = (th - (vh - bb)) + (uh - bb);
        wh = vl + ul;
        vb = d2u(vh);
        expf = (vb >> 52) & 0x7FF;
        h = u2d((expf - 53) << 52); /* ulp(vh)/2 when expf > 53 */
        nz = wh != 0.0;
        opp = nz & ((d2u(wh) ^ vb) >> 63); /* wh != 0 and of the other sign than vh */
        h = (opp & ((vb & 0xFFFFFFFFFFFFFull) == 0)) ? 0.5 * h : h;
        zm = (uint64_t)0 - (uint64_t)(vh == 0.0);
        /* ul == 0: v = th + uh exactly, and vh = RN(th + uh) by construction (ties included) */
        good = (dl == 0.0) & ((nz == 0) | (ul == 0.0) | ((expf > 53) & (fabs(wh) < h)))
               & (a1 <= 0x1p600) & ((a1 == 0.0) | (a1 >= 0x1p-600))
               & (a0 <= 0x1p600) & ((a0 == 0.0) | (a0 >= 0x1p-600));
        res[i] = (vb & ~zm) | (d2u(th) & 0x8000000000000000ull & zm);
        ok[i] = (uint8_t)good;
    }
}

/* ------------------------------------------------------------------------------------ */
/* driver                                                                                */

enum { MODE_COPY = 0, MODE_FAST = 1, MODE_FAST_CHECK = 2, MODE_CHAIN = 3, MODE_GENERIC = 4 };

static int alpha_mode(int fmt, double a)
{
    double m = fabs(a);
    if (a == 0.0)
        return MODE_COPY;
    switch (fmt) {
    case FMT_BF16:
    case FMT_F16:
        if (m < 0x1p-100 || m > 0x1p100)
            return MODE_GENERIC;
        return (double)(float)a == a ? MODE_FAST_CHECK : MODE_FAST;
    case FMT_F32:
        if (m < 0x1p-800 || m > 0x1p800)
            return MODE_GENERIC;
        return (double)(float)a == a ? MODE_FAST_CHECK : MODE_FAST;
    default:
        if (m < 0x1p-300 || m > 0x1p300)
            return MODE_GENERIC;
        return MODE_CHAIN;
    }
}

typedef struct {
    int fmt;
    int m;                      /* elements in this block */
    uint16_t H1[BLK], H0[BLK];  /* BF16/F16 raw bits (block-local: outputs may alias inputs) */
    uint16_t O16[BLK];          /* one alpha's block of output, finished here, then stored */
    uint32_t O32[BLK];
    uint64_t O64[BLK];
    int stream;                 /* store outputs with non-temporal stores (large calls) */
    uint32_t S1[BLK], S0[BLK];  /* F32 raw bits */
    uint64_t R1[BLK], R0[BLK];  /* F64 raw bits */
    float X1f[BLK], X0f[BLK], Df[BLK];   /* BF16/F16: x1, x0, fl32(x1 - x0) */
    uint32_t DEXf[BLK];
    double X1[BLK], X0[BLK], D[BLK];     /* F32: x1, x0, fl64(x1 - x0); F64: x1, x0 */
    uint64_t DEX[BLK];
    uint16_t flag16[BLK];       /* tier 1 flags, as wide as the output (cheaper to pack) */
    uint32_t flag32[BLK];
    uint8_t OK[BLK];
    uint16_t idx[BLK + 8];               /* tier 2: the flagged elements, gathered */
    float G1f[BLK], G0f[BLK], GDf[BLK];
    double G1[BLK], G0[BLK], GD[BLK];
    uint32_t RES[BLK], OK32[BLK];
    uint64_t n_tier2, n_tier3;
} block_t;

KINLINE uint32_t two_sum_exact(double a, double b, double s)
{
    double bb = s - a;
    return ((a - (s - bb)) + (b - bb)) == 0.0;
}

/* Tier 2 for one flagged element. The bracket [lo, hi] = [fl(r - B), fl(r + B)] holds v (see
 * the header), and rl = RN(lo) <= RN(v) <= rh = RN(hi). If rl == rh, that is RN(v). If they
 * are adjacent finite values, RN(v) is rl or rh and the boundary is m = (rl + rh)/2 (exact in
 * float64); sign(v - m) = sign((x1 - m) + a*d) is decided exactly: d = x1 - x0, e = x1 - m and
 * s = e + ph must be exact (checked), a*d = ph + pl exactly (fma), and RN(s + pl) has the sign
 * of s + pl (and is 0 only if s + pl is: a tie, nearest-even). Zero results are refused (the
 * sign of an exact zero comes from the IEEE evaluation). Returns 0 when it cannot decide (then
 * tier 3). Branch free: the flagged elements are random, mispredicted branches cost more. */
KINLINE uint32_t tier2_half(int fmt, double x1, double x0, float x1f, float df, float a32,
                            double a, uint32_t *res)
{
    const uint32_t sign = 0x8000u, infb = (uint32_t)FMT[fmt].inf;
    float p = a32 * df, r = x1f + p;
    float B = fmaf(fabsf(r) + fabsf(p), 0x1p-22f, 0x1p-148f);
    uint32_t rl = fmt == FMT_BF16 ? f32_to_bf16_rne(r - B) : f32_to_f16_rne(r - B);
    uint32_t rh = fmt == FMT_BF16 ? f32_to_bf16_rne(r + B) : f32_to_f16_rne(r + B);
    /* rl == rh: that is RN(v). Else they must be adjacent: bits differ by one, same sign,
     * both finite. */
    uint32_t same = rl == rh;
    uint32_t adjacent = (((rl ^ rh) & sign) == 0) & (rl - rh + 1u <= 2u) & (rl != rh)
                        & ((rl & ~sign) < infb) & ((rh & ~sign) < infb);
    double lv = fmt == FMT_BF16 ? (double)u2f((rl & 0xFFFFu) << 16) : f16_to_f64_finite(rl);
    double hv = fmt == FMT_BF16 ? (double)u2f((rh & 0xFFFFu) << 16) : f16_to_f64_finite(rh);
    double m = (lv + hv) * 0.5;
    double d = x1 - x0, e = x1 - m, ph = a * d, pl = fma(a, d, -ph), s = e + ph, t = s + pl;
    uint32_t pick, ok;
    adjacent &= two_sum_exact(x1, -x0, d) & two_sum_exact(x1, -m, e) & two_sum_exact(e, ph, s);
    pick = t > 0.0 ? rh : (t < 0.0 ? rl : ((rl & 1u) ? rh : rl)); /* t == 0: a tie */
    pick = same ? rh : pick;
    ok = (fabsf(r) <= FLT_MAX) & (same | adjacent);
    ok &= (pick & ~sign) != 0; /* a zero result: its sign needs the IEEE evaluation */
    *res = pick;
    return ok;
}

KINLINE uint32_t tier2_f32(double x1, double x0, double d, double a, uint32_t *res)
{
    const uint32_t sign = 0x80000000u;
    double p = a * d, r = x1 + p;
    double B = fma(fabs(r) + fabs(p), 0x1p-51, 0x1p-1070);
    uint32_t rl = f2u((float)(r - B)), rh = f2u((float)(r + B));
    uint32_t same = rl == rh;
    uint32_t adjacent = (((rl ^ rh) & sign) == 0) & (rl - rh + 1u <= 2u) & (rl != rh)
                        & ((rl & ~sign) < 0x7F800000u) & ((rh & ~sign) < 0x7F800000u);
    double m = ((double)u2f(rl) + (double)u2f(rh)) * 0.5;
    double e = x1 - m, ph = a * d, pl = fma(a, d, -ph), s = e + ph, t = s + pl;
    uint32_t pick, ok;
    adjacent &= two_sum_exact(x1, -x0, d) & two_sum_exact(x1, -m, e) & two_sum_exact(e, ph, s);
    pick = t > 0.0 ? rh : (t < 0.0 ? rl : ((rl & 1u) ? rh : rl));
    pick = same ? rh : pick;
    ok = (fabs(r) <= DBL_MAX) & (same | adjacent);
    ok &= (pick & ~sign) != 0;
    *res = pick;
    return ok;
}

KCLONES static void tier2_half_vec(int fmt, const float *restrict G1, const float *restrict G0,
                                   const float *restrict GD, int n, float a32, double a,
                                   uint32_t *restrict res, uint32_t *restrict ok)
{
    int k;
    if (fmt == FMT_BF16)
        for (k = 0; k < n; k++)
            ok[k] = tier2_half(FMT_BF16, (double)G1[k], (double)G0[k], G1[k], GD[k], a32, a, &res[k]);
    else
        for (k = 0; k < n; k++)
            ok[k] = tier2_half(FMT_F16, (double)G1[k], (double)G0[k], G1[k], GD[k], a32, a, &res[k]);
}

KCLONES static void tier2_f32_vec(const double *restrict G1, const double *restrict G0,
                                  const double *restrict GD, int n, double a,
                                  uint32_t *restrict res, uint32_t *restrict ok)
{
    int k;
    for (k = 0; k < n; k++)
        ok[k] = tier2_f32(G1[k], G0[k], GD[k], a, &res[k]);
}

/* Tiers 2 and 3 for the flagged elements of a block: gather them into contiguous arrays, run
 * tier 2 vectorized, scatter; what tier 2 cannot decide goes to tier 3. */
/* IDX_LUT[m]: the positions of the set bits of the byte m, as 8 uint16 (unused ones 0). */
static uint64_t IDX_LUT[256][2];
static uint8_t IDX_CNT[256];

static void init_idx_lut(void)
{
    int m, j, c;
    for (m = 0; m < 256; m++) {
        uint16_t pos[8] = {0};
        for (j = 0, c = 0; j < 8; j++)
            if (m >> j & 1)
                pos[c++] = (uint16_t)j;
        memcpy(IDX_LUT[m], pos, 16);
        IDX_CNT[m] = (uint8_t)c;
    }
}

/* Indices of the flagged elements (flags are 0/1, 16 or 32 bits wide), without branches:
 * flagged elements are random, and a mispredicted branch costs more than the work. */
static int compact_flags(const block_t *b, int half, uint16_t *restrict idx)
{
    int i, cnt = 0;
    for (i = 0; i < b->m; i += 8) {
        uint64_t w[4], m, base, lo, hi;
        if (half) { /* 4 flags of 16 bits per word -> 4 bits */
            memcpy(w, b->flag16 + i, 16);
            m = ((w[0] * 0x1000200040008000ull) >> 60) | (((w[1] * 0x1000200040008000ull) >> 60) << 4);
        } else { /* 2 flags of 32 bits per word -> 2 bits */
            memcpy(w, b->flag32 + i, 32);
            m = ((w[0] * 0x4000000080000000ull) >> 62) | (((w[1] * 0x4000000080000000ull) >> 62) << 2)
                | (((w[2] * 0x4000000080000000ull) >> 62) << 4) | (((w[3] * 0x4000000080000000ull) >> 62) << 6);
        }
        base = (uint64_t)i * 0x0001000100010001ull; /* i added to 4 uint16 lanes */
        lo = IDX_LUT[m][0] + base;
        hi = IDX_LUT[m][1] + base;
        memcpy(idx + cnt, &lo, 8);
        memcpy(idx + cnt + 4, &hi, 8);
        cnt += IDX_CNT[m];
    }
    return cnt;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define EXPO_HAVE_AVX2_COMPACT 1
static int use_avx2_compact; /* set at import from the CPU's features */

/* compact_flags for 16-bit flags with AVX2: 32 flags -> one 32-bit mask per step (pack to
 * bytes, compare, movemask) instead of eight multiply-shift steps. Reads flag16 up to the next
 * multiple of 32 (BLK is one; the tail of a short block is zeroed by run_half). */
__attribute__((target("avx2"))) static int compact16_avx2(const uint16_t *restrict flag, int m,
                                                           uint16_t *restrict idx)
{
    const __m256i zero = _mm256_setzero_si256();
    int i, j, cnt = 0;
    for (i = 0; i < m; i += 32) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(flag + i));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(flag + i + 16));
        __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xD8);
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(_mm256_cmpgt_epi8(bytes, zero));
        for (j = 0; j < 32; j += 8) {
            uint32_t byte = (mask >> j) & 0xFFu;
            uint64_t base = (uint64_t)(i + j) * 0x0001000100010001ull;
            uint64_t w0 = IDX_LUT[byte][0] + base, w1 = IDX_LUT[byte][1] + base;
            memcpy(idx + cnt, &w0, 8);
            memcpy(idx + cnt + 4, &w1, 8);
            cnt += IDX_CNT[byte];
        }
    }
    return cnt;
}
#endif

static void fix_flagged(block_t *b, double a, void *out)
{
    const int half = b->fmt != FMT_F32;
    int k, cnt;
#ifdef EXPO_HAVE_AVX2_COMPACT
    if (half && use_avx2_compact)
        cnt = compact16_avx2(b->flag16, b->m, b->idx);
    else
#endif
        cnt = compact_flags(b, half, b->idx);
    for (k = 0; k < cnt; k++) {
        int i = b->idx[k];
        if (half) {
            b->G1f[k] = b->X1f[i]; b->G0f[k] = b->X0f[i]; b->GDf[k] = b->Df[i];
        } else {
            b->G1[k] = b->X1[i]; b->G0[k] = b->X0[i]; b->GD[k] = b->D[i];
        }
    }
    if (half)
        tier2_half_vec(b->fmt, b->G1f, b->G0f, b->GDf, cnt, (float)a, a, b->RES, b->OK32);
    else
        tier2_f32_vec(b->G1, b->G0, b->GD, cnt, a, b->RES, b->OK32);
    b->n_tier2 += (uint64_t)cnt;
    for (k = 0; k < cnt; k++) {
        uint32_t r32 = b->RES[k];
        if (!b->OK32[k]) {
            r32 = half ? (uint32_t)exact_generic(b->fmt, (double)b->G1f[k], (double)b->G0f[k], a)
                       : (uint32_t)exact_generic(FMT_F32, b->G1[k], b->G0[k], a);
            b->n_tier3++;
        }
        if (half)
            ((uint16_t *)out)[b->idx[k]] = (uint16_t)r32;
        else
            ((uint32_t *)out)[b->idx[k]] = r32;
    }
}

static void store(int fmt, void *out, int i, uint64_t bits)
{
    switch (fmt) {
    case FMT_BF16:
    case FMT_F16: ((uint16_t *)out)[i] = (uint16_t)bits; break;
    case FMT_F32: ((uint32_t *)out)[i] = (uint32_t)bits; break;
    default: ((uint64_t *)out)[i] = bits; break;
    }
}

static void run_generic(block_t *b, double a, void *out)
{
    int i;
    for (i = 0; i < b->m; i++) {
        double x1 = b->fmt == FMT_F64 ? b->X1[i] : b->fmt == FMT_F32 ? b->X1[i] : (double)b->X1f[i];
        double x0 = b->fmt == FMT_F64 ? b->X0[i] : b->fmt == FMT_F32 ? b->X0[i] : (double)b->X0f[i];
        store(b->fmt, out, i, exact_generic(b->fmt, x1, x0, a));
    }
    b->n_tier3 += (uint64_t)b->m;
}

/* Store a finished block of output. Large calls use non-temporal stores: the outputs are not
 * read again soon, and skipping the read-for-ownership of every line saves memory bandwidth. */
static void put_block(const block_t *b, void *dst, const void *src, size_t bytes)
{
#ifdef EXPO_HAVE_STREAM
    if (b->stream) {
        char *d = (char *)dst;
        const char *s = (const char *)src;
        size_t head = (16 - ((uintptr_t)d & 15)) & 15;
        if (head > bytes)
            head = bytes;
        memcpy(d, s, head);
        d += head; s += head; bytes -= head;
        for (; bytes >= 16; bytes -= 16, d += 16, s += 16)
            _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
        memcpy(d, s, bytes);
        return;
    }
#endif
    memcpy(dst, src, bytes);
}

static void run_half(block_t *b, const uint16_t *x1, const uint16_t *x0, Py_ssize_t n,
                     const double *alphas, const int *modes, int na, void **outs)
{
    Py_ssize_t start;
    int j;
    for (start = 0; start < n; start += BLK) {
        b->m = (int)(n - start < BLK ? n - start : BLK);
        memcpy(b->H1, x1 + start, (size_t)b->m * 2);
        memcpy(b->H0, x0 + start, (size_t)b->m * 2);
        memset(b->flag16 + b->m, 0, (size_t)(BLK - b->m) * 2);
        prep_half(b->fmt, b->H1, b->H0, b->m, b->X1f, b->X0f, b->Df, b->DEXf);
        for (j = 0; j < na; j++) {
            uint16_t *o = b->O16;
            double a = alphas[j];
            if (modes[j] == MODE_COPY)
                o = b->H1;
            else if (modes[j] == MODE_GENERIC)
                run_generic(b, a, o);
            else if (alpha_half(b->fmt, modes[j] == MODE_FAST_CHECK, b->X1f, b->Df, b->DEXf, b->m,
                                (float)a, o, b->flag16))
                fix_flagged(b, a, o);
            put_block(b, (uint16_t *)outs[j] + start, o, (size_t)b->m * 2);
        }
    }
}

static void run_f32(block_t *b, const uint32_t *x1, const uint32_t *x0, Py_ssize_t n,
                    const double *alphas, const int *modes, int na, void **outs)
{
    Py_ssize_t start;
    int j;
    for (start = 0; start < n; start += BLK) {
        b->m = (int)(n - start < BLK ? n - start : BLK);
        memcpy(b->S1, x1 + start, (size_t)b->m * 4);
        memcpy(b->S0, x0 + start, (size_t)b->m * 4);
        memset(b->flag32 + b->m, 0, (size_t)(BLK - b->m) * 4);
        prep_f32(b->S1, b->S0, b->m, b->X1, b->X0, b->D, b->DEX);
        for (j = 0; j < na; j++) {
            uint32_t *o = b->O32;
            double a = alphas[j];
            if (modes[j] == MODE_COPY)
                o = b->S1;
            else if (modes[j] == MODE_GENERIC)
                run_generic(b, a, o);
            else if (alpha_f32(modes[j] == MODE_FAST_CHECK, b->X1, b->D, b->DEX, b->m, a, o, b->flag32))
                fix_flagged(b, a, o);
            put_block(b, (uint32_t *)outs[j] + start, o, (size_t)b->m * 4);
        }
    }
}

static void run_f64(block_t *b, const uint64_t *x1, const uint64_t *x0, Py_ssize_t n,
                    const double *alphas, const int *modes, int na, void **outs)
{
    Py_ssize_t start;
    int j, i;
    for (start = 0; start < n; start += BLK) {
        b->m = (int)(n - start < BLK ? n - start : BLK);
        memcpy(b->R1, x1 + start, (size_t)b->m * 8);
        memcpy(b->R0, x0 + start, (size_t)b->m * 8);
        memcpy(b->X1, b->R1, (size_t)b->m * 8);
        memcpy(b->X0, b->R0, (size_t)b->m * 8);
        for (j = 0; j < na; j++) {
            uint64_t *o = b->O64;
            double a = alphas[j];
            if (modes[j] == MODE_COPY) {
                o = b->R1;
            } else if (modes[j] == MODE_GENERIC) {
                run_generic(b, a, o);
            } else {
                chain_f64(b->X1, b->X0, b->m, a, o, b->OK);
                b->n_tier2 += (uint64_t)b->m;
                for (i = 0; i < b->m; i++)
                    if (!b->OK[i]) {
                        o[i] = exact_generic(FMT_F64, b->X1[i], b->X0[i], a);
                        b->n_tier3++;
                    }
            }
            put_block(b, (uint64_t *)outs[j] + start, o, (size_t)b->m * 8);
        }
    }
}

/* Counts of elements x alphas that needed tier 2 / tier 3 since import (for benchmarks). */
static unsigned long long total_elems, total_tier2, total_tier3;

static void run_kernel(block_t *b, const void *x1, const void *x0, Py_ssize_t n,
                       const double *alphas, const int *modes, int na, void **outs)
{
#ifdef EXPO_HAVE_MXCSR
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr & ~(0x6000u | 0x8000u | 0x0040u)); /* RC = nearest, FTZ off, DAZ off */
#else
    int rounding = fegetround();
    fesetround(FE_TONEAREST);
#endif
    switch (b->fmt) {
    case FMT_BF16:
    case FMT_F16:
        run_half(b, (const uint16_t *)x1, (const uint16_t *)x0, n, alphas, modes, na, outs);
        break;
    case FMT_F32:
        run_f32(b, (const uint32_t *)x1, (const uint32_t *)x0, n, alphas, modes, na, outs);
        break;
    default:
        run_f64(b, (const uint64_t *)x1, (const uint64_t *)x0, n, alphas, modes, na, outs);
        break;
    }
#ifdef EXPO_HAVE_STREAM
    if (b->stream)
        _mm_sfence(); /* non-temporal stores are visible before we return */
#endif
#ifdef EXPO_HAVE_MXCSR
    _mm_setcsr(csr);
#else
    fesetround(rounding);
#endif
}

/* ------------------------------------------------------------------------------------ */
/* Python binding                                                                        */

static const Py_ssize_t ITEMSIZE[4] = {2, 2, 4, 8};

PyDoc_STRVAR(extrapolate_into_doc,
"extrapolate_into(fmt, aligned, sft, alphas, outs)\n--\n\n"
"fmt: 0=BF16 1=F16 2=F32 3=F64. aligned, sft: C-contiguous buffers of raw bits (itemsize 2, 2,\n"
"4, 8), same length. alphas: sequence of finite floats. outs: one writable C-contiguous buffer of\n"
"the same length per alpha (may be the aligned/sft buffer itself, must not partially overlap).\n"
"Writes round_nearest_even(x1 + alpha*(x1 - x0)) for every alpha. Releases the GIL.");

static PyObject *py_extrapolate_into(PyObject *self, PyObject *args)
{
    int fmt;
    PyObject *o_al, *o_sft, *o_alphas, *o_outs, *seq_a = NULL, *seq_o = NULL, *ret = NULL;
    Py_buffer b_al = {0}, b_sft = {0}, *b_out = NULL;
    double *alphas = NULL;
    int *modes = NULL;
    void **outs = NULL;
    block_t *blk = NULL;
    Py_ssize_t na = 0, nouts_acquired = 0, n, j;
    (void)self;

    if (!PyArg_ParseTuple(args, "iOOOO:extrapolate_into", &fmt, &o_al, &o_sft, &o_alphas, &o_outs))
        return NULL;
    if (fmt < 0 || fmt > 3) {
        PyErr_Format(PyExc_ValueError, "unknown format code %d", fmt);
        return NULL;
    }
    if (PyObject_GetBuffer(o_al, &b_al, PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    if (PyObject_GetBuffer(o_sft, &b_sft, PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    if (b_al.itemsize != ITEMSIZE[fmt] || b_sft.itemsize != ITEMSIZE[fmt]) {
        PyErr_Format(PyExc_ValueError, "aligned/sft must have itemsize %zd for this format", ITEMSIZE[fmt]);
        goto done;
    }
    n = b_al.len / ITEMSIZE[fmt];
    if (b_sft.len != b_al.len) {
        PyErr_SetString(PyExc_ValueError, "aligned and sft differ in length");
        goto done;
    }
    seq_a = PySequence_Fast(o_alphas, "alphas must be a sequence of floats");
    if (!seq_a)
        goto done;
    seq_o = PySequence_Fast(o_outs, "outs must be a sequence of buffers");
    if (!seq_o)
        goto done;
    na = PySequence_Fast_GET_SIZE(seq_a);
    if (PySequence_Fast_GET_SIZE(seq_o) != na) {
        PyErr_SetString(PyExc_ValueError, "need exactly one output buffer per alpha");
        goto done;
    }
    if (na > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many alphas");
        goto done;
    }
    alphas = PyMem_Malloc(sizeof(double) * (size_t)(na ? na : 1));
    modes = PyMem_Malloc(sizeof(int) * (size_t)(na ? na : 1));
    outs = PyMem_Malloc(sizeof(void *) * (size_t)(na ? na : 1));
    b_out = PyMem_Calloc((size_t)(na ? na : 1), sizeof(Py_buffer));
    if (!alphas || !modes || !outs || !b_out) {
        PyErr_NoMemory();
        goto done;
    }
    for (j = 0; j < na; j++) {
        double a = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq_a, j));
        if (a == -1.0 && PyErr_Occurred())
            goto done;
        if (!isfinite(a)) {
            PyErr_SetString(PyExc_ValueError, "alpha must be finite");
            goto done;
        }
        alphas[j] = a;
        modes[j] = alpha_mode(fmt, a);
    }
    for (j = 0; j < na; j++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq_o, j), &b_out[j],
                               PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto done;
        nouts_acquired = j + 1;
        if (b_out[j].itemsize != ITEMSIZE[fmt] || b_out[j].len != b_al.len) {
            PyErr_SetString(PyExc_ValueError, "every output buffer must match the inputs' itemsize and length");
            goto done;
        }
        outs[j] = b_out[j].buf;
    }
    blk = PyMem_RawMalloc(sizeof(block_t));
    if (!blk) {
        PyErr_NoMemory();
        goto done;
    }
    blk->fmt = fmt;
    blk->n_tier2 = blk->n_tier3 = 0;
    /* outputs much larger than the caches: stream them (keep small results in cache) */
    blk->stream = (double)b_al.len * (double)na >= 8.0 * 1024 * 1024;
    Py_BEGIN_ALLOW_THREADS
    run_kernel(blk, b_al.buf, b_sft.buf, n, alphas, modes, (int)na, outs);
    Py_END_ALLOW_THREADS
    total_elems += (unsigned long long)n * (unsigned long long)na;
    total_tier2 += blk->n_tier2;
    total_tier3 += blk->n_tier3;
    ret = Py_None;
    Py_INCREF(ret);

done:
    for (j = 0; j < nouts_acquired; j++)
        PyBuffer_Release(&b_out[j]);
    if (b_al.obj)
        PyBuffer_Release(&b_al);
    if (b_sft.obj)
        PyBuffer_Release(&b_sft);
    Py_XDECREF(seq_a);
    Py_XDECREF(seq_o);
    PyMem_Free(alphas);
    PyMem_Free(modes);
    PyMem_Free(outs);
    PyMem_Free(b_out);
    PyMem_RawFree(blk);
    return ret;
}

static PyObject *py_build_info(PyObject *self, PyObject *noargs)
{
    const char *isa = "baseline";
    (void)self; (void)noargs;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        isa = "x86-64-v4 (AVX-512) capable CPU";
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        isa = "x86-64-v3 (AVX2+FMA) capable CPU";
#endif
    return PyUnicode_FromFormat("%s; %s", EXPO_CLONES_DESC, isa);
}

static PyObject *py_stats(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    return Py_BuildValue("{s:K,s:K,s:K}", "element_alphas", total_elems, "tier2", total_tier2,
                         "tier3", total_tier3);
}

static PyObject *py_exact_scalar(PyObject *self, PyObject *args)
{
    int fmt;
    double x1, x0, a;
    (void)self;
    if (!PyArg_ParseTuple(args, "iddd:exact_scalar", &fmt, &x1, &x0, &a))
        return NULL;
    if (fmt < 0 || fmt > 3 || !isfinite(a)) {
        PyErr_SetString(PyExc_ValueError, "bad format code or non-finite alpha");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(exact_generic(fmt, x1, x0, a));
}

static PyMethodDef methods[] = {
    {"exact_scalar", py_exact_scalar, METH_VARARGS,
     "exact_scalar(fmt, x1, x0, alpha) -> bits: the big-integer path for one element (x1, x0 "
     "are the decoded input values as floats); for tests."},
    {"stats", py_stats, METH_NOARGS,
     "Counts since import: element*alpha results computed, and how many needed the exact "
     "float64 error-free path (tier2, all of F64) or the big-integer path (tier3)."},
    {"extrapolate_into", py_extrapolate_into, METH_VARARGS, extrapolate_into_doc},
    {"build_info", py_build_info, METH_NOARGS, "How the kernel was built and which ISA the CPU offers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "expo_ray._kernel",
    "Correctly rounded ExPO extrapolation kernel (see expo_ray.kernel).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    init_idx_lut();
#ifdef EXPO_HAVE_AVX2_COMPACT
    __builtin_cpu_init();
    {
        const char *off = getenv("EXPO_RAY_KERNEL_NO_AVX2"); /* tests compare both paths */
        use_avx2_compact = __builtin_cpu_supports("avx2") && !(off && *off);
    }
#endif
    return PyModule_Create(&moduledef);
}
