"""Which alpha to recommend, with a stated error rate (pure: rewards in, decision out).

Input: per alpha, the rewards of its answers to one list of prompts in a fixed order (a point with
``n`` rewards covers the first ``n`` prompts; two points are compared on the prompts both have).
The unit of evidence is the prompt: every comparison is *paired* (the difference of two alphas'
rewards on the same prompt) and its interval comes from a bootstrap over prompts in which every
comparison on the same prompts uses the same resamples.

The rule:

1. ``best`` is the candidate with the highest mean reward (ties: the smaller alpha).
2. An alpha *beats alpha 0* when the lower end of the paired interval of its difference from
   alpha 0 is above 0. It is *tied with the best* when the paired interval of its difference from
   the best contains 0.
3. When no alpha beats alpha 0 (or alpha 0 is itself tied with the best), the recommendation is
   alpha 0: no significant gain over the aligned model. Otherwise it is the smallest alpha tied
   with the best.

Multiple comparisons: with ``m`` alphas compared against alpha 0, each interval is a two-sided
``1 - (1 - level) / m`` interval (Bonferroni), so the chance of claiming a gain when no alpha
truly differs from alpha 0 is at most ``1 - level`` for the whole grid. Per-prompt differences
within ``tolerance`` (relative to the reward scale) count as exact ties: a different batch can
move a float32 reward in its last digits, and that is not a preference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95
SAMPLES = 4000
TOLERANCE = 1e-5

NO_GAIN = "no significant gain over the aligned model"
GAIN = "significant gain over the aligned model"
NO_BASELINE = "alpha 0 was not evaluated: the smallest alpha tied with the best"


@dataclass(frozen=True)
class Paired:
    """One alpha against alpha 0 and against the best, on the prompts each pair shares."""
    alpha: float
    n: int
    mean: float
    gain: float | None         # mean paired difference from alpha 0
    gain_low: float | None
    gain_high: float | None
    win_rate: float | None     # share of shared prompts where it beats alpha 0 (ties count half)
    vs_best: float             # mean paired difference from the best
    vs_best_low: float
    vs_best_high: float
    beats_aligned: bool
    tied_with_best: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Selection:
    recommended: float
    best: float
    case: str                  # NO_GAIN, GAIN or NO_BASELINE, in words
    level: float               # the family-wise level of the whole grid
    interval_level: float      # the level of each paired interval (after Bonferroni)
    samples: int
    points: dict[float, Paired]

    @property
    def gain(self) -> bool:
        return self.case == GAIN

    def summary(self) -> dict:
        """What reports keep: the decision, its case in words and the rule's settings."""
        rec = self.points[self.recommended]
        return {"recommended": self.recommended, "best_mean": self.best, "case": self.case,
                "significant_gain": self.gain, "gain": rec.gain, "gain_low": rec.gain_low,
                "gain_high": rec.gain_high, "win_rate": rec.win_rate, "level": self.level,
                "interval_level": self.interval_level, "bootstrap_samples": self.samples,
                "rule": "smallest alpha tied with the best (paired interval of the difference contains 0); "
                        "alpha 0 when no alpha beats it beyond its paired interval"}


class _Resamples:
    """Bootstrap weights per prompt count, drawn once from one seed: every comparison on the same
    prompts sees the same resamples."""

    def __init__(self, samples: int, seed: int):
        self.samples, self.seed, self._by_n = samples, seed, {}

    def means(self, diff: np.ndarray) -> np.ndarray:
        n = len(diff)
        if n not in self._by_n:
            rng = np.random.default_rng([self.seed, n])
            idx = rng.integers(0, n, size=(self.samples, n)) + n * np.arange(self.samples)[:, None]
            counts = np.bincount(idx.ravel(), minlength=self.samples * n).reshape(self.samples, n)
            self._by_n[n] = counts / n
        return self._by_n[n] @ diff


def select_alpha(rewards: Mapping[float, Sequence[float]], *, candidates: Sequence[float] | None = None,
                 level: float = LEVEL, samples: int = SAMPLES, seed: int = 0,
                 tolerance: float = TOLERANCE) -> Selection:
    """Apply the rule (module docstring) to ``rewards`` (alpha -> rewards on the first n prompts).

    ``candidates``: the alphas that may be best or recommended (default: all); alpha 0, when
    present, is always the baseline and always a possible answer.
    """
    table = {float(a): np.asarray(r, dtype=np.float64) for a, r in rewards.items()}
    if not table or any(len(r) == 0 for r in table.values()):
        raise ValueError("every alpha needs at least one reward")
    if any(not np.isfinite(r).all() for r in table.values()):
        raise ValueError("rewards must be finite numbers")
    pool = sorted(table if candidates is None else {float(a) for a in candidates} & set(table))
    if not pool:
        raise ValueError("none of the candidates has rewards")
    has_zero = 0.0 in table
    scale = max(1.0, max(float(np.abs(r).max()) for r in table.values()))
    tol = tolerance * scale
    others = [a for a in pool if a != 0.0]
    interval_level = 1 - (1 - level) / max(1, len(others))
    tail = 100 * (1 - interval_level) / 2
    resamples = _Resamples(samples, seed)

    def paired(a: float, b: float) -> tuple[float, float, float, np.ndarray]:
        n = min(len(table[a]), len(table[b]))
        d = table[a][:n] - table[b][:n]
        d = np.where(np.abs(d) <= tol, 0.0, d)
        if not d.any():
            return 0.0, 0.0, 0.0, d
        low, high = np.percentile(resamples.means(d), [tail, 100 - tail])
        return float(d.mean()), float(low), float(high), d

    best = min(pool, key=lambda a: (-table[a].mean(), a))
    points = {}
    for a in sorted(set(pool) | ({0.0} if has_zero else set())):
        vs_best, vb_low, vb_high, _ = paired(a, best)
        gain = low = high = win = None
        if has_zero:
            gain, low, high, d = paired(a, 0.0)
            win = float(((d > 0) + 0.5 * (d == 0)).mean())
        points[a] = Paired(alpha=a, n=len(table[a]), mean=float(table[a].mean()), gain=gain, gain_low=low,
                           gain_high=high, win_rate=win, vs_best=vs_best, vs_best_low=vb_low,
                           vs_best_high=vb_high, beats_aligned=bool(has_zero and a != 0.0 and low > 0),
                           tied_with_best=vb_low <= 0 <= vb_high)
    tied = [a for a in pool if points[a].tied_with_best]
    if not has_zero:
        recommended, case = min(tied), NO_BASELINE
    elif points[0.0].tied_with_best or not any(points[a].beats_aligned for a in others):
        recommended, case = 0.0, NO_GAIN
    else:
        recommended, case = min(tied), GAIN
    return Selection(recommended=recommended, best=best, case=case, level=level,
                     interval_level=interval_level, samples=samples, points=points)


def runner_up(rewards: Mapping[float, Sequence[float]], selection: Selection,
              candidates: Sequence[float] | None = None, **kwargs) -> float | None:
    """The rule's choice once the recommended alpha is set aside (alpha 0 stays the baseline when
    it was not the recommendation), or None when no other candidate is left."""
    pool = [float(a) for a in (rewards if candidates is None else candidates) if float(a) != selection.recommended]
    if not pool:
        return None
    return select_alpha(rewards if selection.recommended != 0.0 else
                        {a: r for a, r in rewards.items() if float(a) != 0.0},
                        candidates=pool, **kwargs).recommended


def describe(selection: Selection) -> str:
    """One sentence for reports: the recommendation and which case of the rule holds."""
    rec = selection.points[selection.recommended]
    pct = f"{100 * selection.level:g}%"
    if selection.case == NO_GAIN:
        return (f"alpha 0: {NO_GAIN} (no alpha's paired interval of its difference from alpha 0 lies above 0; "
                f"family-wise {pct}; highest mean at alpha {selection.best:g})")
    if selection.case == NO_BASELINE:
        return f"alpha {selection.recommended:g}: {NO_BASELINE} (alpha {selection.best:g} has the highest mean)"
    return (f"alpha {selection.recommended:g}: {GAIN}, {rec.gain:+.4f} [{rec.gain_low:+.4f}, {rec.gain_high:+.4f}] "
            f"(paired, family-wise {pct}), the smallest alpha not distinguishable from the best "
            f"(alpha {selection.best:g})")
