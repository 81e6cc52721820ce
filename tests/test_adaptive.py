"""The adaptive alpha search schedule (pure logic, no engines)."""
import numpy as np
import pytest

from expo_ray.alpha_search.adaptive import _refinements, adaptive_search, default_budget, point_stats


def noisy_rewards(peak: float, noise: float = 1.0, n_prompts: int = 256, seed: int = 0):
    """evaluate(alpha, n): a concave mean reward peaking at `peak`, plus per-prompt noise that is
    fixed per (alpha, prompt) like a seeded sampler's answers."""
    calls = []

    def evaluate(alpha: float, n: int):
        calls.append((alpha, n))
        rng = np.random.default_rng([seed, int(round(alpha * 1e6)) & 0xFFFFFFFF])
        return list(1.0 - (alpha - peak) ** 2 / 10 + noise * rng.normal(size=n_prompts)[:n])
    return evaluate, calls


def test_finds_the_peak_within_half_the_grid_budget():
    grid = [0, 0.5, 1, 2, 4, 8]
    evaluate, calls = noisy_rewards(peak=2.7, noise=0.5)
    outcome = adaptive_search(evaluate, grid, 256)
    assert outcome.budget == default_budget(grid, 256) == 768
    assert outcome.generations <= outcome.budget
    assert sum(n - prev for (a, n), prev in _increments(calls)) == outcome.generations
    assert 2 <= outcome.best <= 4
    assert outcome.runner_up is not None and outcome.runner_up != outcome.best
    assert any(p.phase == "refine" for p in outcome.points.values())
    assert all(p.n <= 256 for p in outcome.points.values())


def _increments(calls):
    seen = {}
    for alpha, n in calls:
        yield (alpha, n), seen.get(alpha, 0)
        seen[alpha] = n


def test_points_only_grow_and_the_winner_has_the_most_prompts():
    evaluate, calls = noisy_rewards(peak=0.3, noise=0.2)
    outcome = adaptive_search(evaluate, [0, 0.25, 0.5, 1], 64, budget=200)
    for (alpha, n), prev in _increments(calls):
        assert n > prev
    most = max(p.n for p in outcome.points.values())
    # A gain of 0.01 under noise 0.2 is not beyond the paired interval: the search says alpha 0.
    assert outcome.best == 0.0 and not outcome.selection.gain
    assert outcome.points[outcome.runner_up].n == most


def test_winner_and_runner_up_follow_the_selection_rule_on_shared_prompts():
    evaluate, _ = noisy_rewards(peak=2.7, noise=0.3)
    outcome = adaptive_search(evaluate, [0, 0.5, 1, 2, 4, 8], 256)
    sel = outcome.selection
    most = max(p.n for p in outcome.points.values())
    assert outcome.best == sel.recommended and sel.gain and outcome.points[outcome.best].n == most
    assert sel.points[0.0].n < most and sel.points[outcome.best].gain_low > 0
    # the paired gain is measured on the prompts alpha 0 and the winner share
    shared = outcome.points[0.0].n
    diff = np.subtract(outcome.points[outcome.best].rewards[:shared], outcome.points[0.0].rewards)
    assert sel.points[outcome.best].gain == pytest.approx(diff.mean())
    assert outcome.runner_up != outcome.best and outcome.points[outcome.runner_up].n == most


def test_refinement_brackets_the_best():
    assert _refinements(2.0, [0.0, 1.0, 2.0, 4.0]) == [1.5, 3.0]
    assert _refinements(4.0, [0.0, 2.0, 4.0]) == [3.0, 6.0]     # top of the grid: a step beyond
    assert _refinements(0.0, [0.0, 1.0]) == [0.5]
    assert _refinements(2.0, [1.5, 2.0, 3.0]) == [1.75, 2.5]


def test_bad_settings_are_refused():
    evaluate, _ = noisy_rewards(peak=1.0)
    with pytest.raises(ValueError, match="at least two alphas"):
        adaptive_search(evaluate, [0.5], 64)
    with pytest.raises(ValueError, match="budget of 10"):
        adaptive_search(evaluate, [0, 1, 2], 64, budget=10)


def test_point_stats_has_an_interval_around_the_mean():
    evaluate, _ = noisy_rewards(peak=1.0)
    outcome = adaptive_search(evaluate, [0, 1, 2], 64)
    stats = point_stats(outcome.points[outcome.best])
    assert stats["ci_low"] <= stats["mean_reward"] <= stats["ci_high"]
    assert stats["n"] == outcome.points[outcome.best].n
