"""Per-alpha statistics of scored responses and the choice of alpha.

Mean reward with a 95% bootstrap interval, mean response length, share of truncated answers,
and, paired with alpha = 0 (the aligned model) on the same prompts, the gain with its interval
and the win rate. Which alpha is recommended is :mod:`.selection`'s rule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .selection import Selection, select_alpha

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Scored:
    prompt_id: str
    reward: float
    tokens: int
    finish_reason: str


@dataclass(frozen=True)
class AlphaStats:
    label: str            # "alpha_0.3", "sft"
    alpha: float | None   # None for the SFT model
    n: int
    mean_reward: float
    ci_low: float
    ci_high: float
    mean_tokens: float
    truncated_share: float
    win_rate_vs_aligned: float | None
    gain_vs_aligned: float | None = None   # paired mean difference from alpha 0 ...
    gain_ci_low: float | None = None       # ... and its interval (see .selection)
    gain_ci_high: float | None = None
    tied_with_best: bool | None = None
    recommended: bool = False
    # the rewards in the prompt order shared by every label, for the selection (not reported)
    rewards: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("rewards")
        return d


def bootstrap_ci(values: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def win_rate(rewards: dict[str, float], baseline: dict[str, float]) -> float | None:
    """Share of shared prompts where the reward beats the baseline's (ties count half)."""
    shared = sorted(set(rewards) & set(baseline))
    if not shared:
        return None
    a = np.array([rewards[p] for p in shared])
    b = np.array([baseline[p] for p in shared])
    return float(((a > b) + 0.5 * (a == b)).mean())


def summarize(results: dict[str, list[Scored]], alphas: dict[str, float | None], seed: int = 0) -> list[AlphaStats]:
    """Stats per label, ordered SFT first then by alpha. `alphas` maps label -> alpha (None: SFT)."""
    baseline_label = next((label for label, a in alphas.items() if a == 0.0), None)
    baseline = {s.prompt_id: s.reward for s in results.get(baseline_label, [])} if baseline_label else {}
    id_sets = [{s.prompt_id for s in v} for v in results.values()]
    shared = [p for p in (s.prompt_id for s in next(iter(results.values()), [])) if all(p in ids for ids in id_sets)]
    stats = []
    for label, scored in results.items():
        by_prompt = {s.prompt_id: s.reward for s in scored}
        rewards = np.array([s.reward for s in scored], dtype=np.float64)
        low, high = bootstrap_ci(rewards, seed)
        stats.append(AlphaStats(
            label=label, alpha=alphas[label], n=len(scored),
            mean_reward=float(rewards.mean()) if len(rewards) else float("nan"), ci_low=low, ci_high=high,
            mean_tokens=float(np.mean([s.tokens for s in scored])) if scored else float("nan"),
            truncated_share=float(np.mean([s.finish_reason == "length" for s in scored])) if scored else float("nan"),
            win_rate_vs_aligned=(win_rate({s.prompt_id: s.reward for s in scored}, baseline)
                                 if baseline and label != baseline_label
                                 else (0.5 if label == baseline_label else None)),
            rewards=tuple(by_prompt[p] for p in shared),
        ))
    stats = sorted(stats, key=lambda s: (s.alpha is not None, s.alpha if s.alpha is not None else 0.0))
    chosen = select(stats)
    if chosen is None:
        return stats
    out = []
    for s in stats:
        p = chosen.points.get(s.alpha) if s.alpha is not None else None
        if p is None:
            out.append(s)
            continue
        out.append(replace(s, gain_vs_aligned=p.gain, gain_ci_low=p.gain_low, gain_ci_high=p.gain_high,
                           win_rate_vs_aligned=p.win_rate if p.win_rate is not None else s.win_rate_vs_aligned,
                           tied_with_best=p.tied_with_best, recommended=s.alpha == chosen.recommended))
    return out


def select(stats: list[AlphaStats]) -> Selection | None:
    """The selection rule over the alphas of ``stats`` (SFT excluded), on their shared prompts."""
    points = {s.alpha: s.rewards for s in stats if s.alpha is not None and s.rewards}
    return select_alpha(points) if points else None


def recommended_alpha(stats: list[AlphaStats]) -> AlphaStats:
    """The alpha the selection rule recommends (marked by :func:`summarize`)."""
    return next(s for s in stats if s.recommended)
