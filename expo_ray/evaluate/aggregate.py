"""Per-alpha statistics of scored responses and the choice of alpha.

Mean reward with a 95% bootstrap interval, mean response length, share of truncated answers,
and the paired win rate against alpha = 0 (the aligned model) on the same prompts. The best
alpha has the highest mean reward; ties go to the smaller alpha.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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

    def as_dict(self) -> dict:
        return asdict(self)


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
    baseline_label = next((l for l, a in alphas.items() if a == 0.0), None)
    baseline = {s.prompt_id: s.reward for s in results.get(baseline_label, [])} if baseline_label else {}
    stats = []
    for label, scored in results.items():
        rewards = np.array([s.reward for s in scored], dtype=np.float64)
        low, high = bootstrap_ci(rewards, seed)
        stats.append(AlphaStats(
            label=label, alpha=alphas[label], n=len(scored),
            mean_reward=float(rewards.mean()) if len(rewards) else float("nan"), ci_low=low, ci_high=high,
            mean_tokens=float(np.mean([s.tokens for s in scored])) if scored else float("nan"),
            truncated_share=float(np.mean([s.finish_reason == "length" for s in scored])) if scored else float("nan"),
            win_rate_vs_aligned=(win_rate({s.prompt_id: s.reward for s in scored}, baseline)
                                 if baseline and label != baseline_label else (0.5 if label == baseline_label else None)),
        ))
    return sorted(stats, key=lambda s: (s.alpha is not None, s.alpha if s.alpha is not None else 0.0))


def best_alpha(stats: list[AlphaStats]) -> AlphaStats:
    """Highest mean reward among the extrapolated variants (and alpha 0); ties to the smaller alpha."""
    candidates = [s for s in stats if s.alpha is not None]
    return min(candidates, key=lambda s: (-s.mean_reward, s.alpha))
