"""The alpha selection rule on synthetic score tables (pure, no engines)."""
import numpy as np
import pytest

from expo_ray.evaluation.selection import GAIN, NO_BASELINE, NO_GAIN, describe, runner_up, select_alpha


def table(means: dict, n: int = 200, noise: float = 1.0, seed: int = 0) -> dict:
    """Rewards per alpha: a per-prompt difficulty shared by every alpha (what pairing removes)
    plus the alpha's mean plus independent noise."""
    rng = np.random.default_rng(seed)
    prompt = 3.0 * rng.normal(size=n)
    return {a: prompt + m + noise * rng.normal(size=n) for a, m in means.items()}


def test_exact_ties_go_to_the_smaller_alpha():
    base = np.linspace(0, 1, 50)
    sel = select_alpha({0.0: base, 1.0: base + 1, 2.0: base + 1, 4.0: base + 1})
    assert sel.recommended == 1.0 and sel.best == 1.0 and sel.case == GAIN
    assert sel.points[2.0].tied_with_best and sel.points[2.0].vs_best == 0.0
    assert sel.points[1.0].gain == 1.0 and sel.points[1.0].win_rate == 1.0


def test_float_noise_does_not_pick_a_larger_alpha():
    # The plateau of a saturated task: the same answers, rewards differing in float32's last digits.
    rng = np.random.default_rng(3)
    plateau = 5.0 + rng.normal(size=256) * 0.01
    rewards = {0.0: plateau - 0.5, 4.0: plateau, 8.0: plateau + 1e-6, 16.0: plateau - 2e-6, 64.0: plateau + 4e-6}
    sel = select_alpha(rewards)
    assert sel.best == 64.0  # the highest mean, by float noise
    assert sel.recommended == 4.0 and sel.case == GAIN
    assert all(sel.points[a].tied_with_best and sel.points[a].vs_best == 0.0 for a in (4.0, 8.0, 16.0, 64.0))


def test_near_ties_within_noise_go_to_the_smaller_alpha():
    rewards = table({0.0: 0.0, 1.0: 1.0, 2.0: 1.03, 4.0: 0.2})
    sel = select_alpha(rewards)
    assert sel.best in (1.0, 2.0)
    assert sel.recommended == 1.0 and sel.points[2.0].tied_with_best
    assert not sel.points[4.0].tied_with_best and sel.points[4.0].vs_best_high < 0


def test_an_interior_best_beyond_its_neighbours_intervals_is_chosen():
    sel = select_alpha(table({0.0: 0.0, 1.0: 0.5, 2.0: 1.5, 4.0: 0.7, 8.0: -2.0}))
    assert sel.recommended == 2.0 == sel.best and sel.case == GAIN
    assert sel.points[1.0].beats_aligned and not sel.points[1.0].tied_with_best
    assert sel.points[8.0].gain_high < 0


def test_no_gain_means_alpha_0_even_when_a_larger_alpha_has_the_highest_mean():
    sel = select_alpha(table({0.0: 0.0, 0.5: 0.05, 1.0: 0.08, 2.0: -1.0}, n=100))
    assert sel.best == 1.0 and sel.recommended == 0.0 and sel.case == NO_GAIN
    assert describe(sel).startswith("alpha 0: no significant gain over the aligned model")
    identical = np.arange(10.0)
    sel = select_alpha({0.0: identical, 1.0: identical, 2.0: identical})
    assert sel.recommended == 0.0 and sel.case == NO_GAIN and sel.points[1.0].win_rate == 0.5


def test_alpha_0_is_recommended_when_it_is_the_best():
    sel = select_alpha(table({0.0: 1.0, 1.0: 0.0, 2.0: -1.0}))
    assert sel.best == 0.0 and sel.recommended == 0.0 and sel.case == NO_GAIN


def test_family_wise_error_rate_over_a_grid_of_null_alphas():
    """No alpha differs from alpha 0: a gain is claimed in at most about 5% of experiments, although
    each experiment compares eight alphas."""
    claims = sum(select_alpha(table({a: 0.0 for a in (0, 1, 2, 3, 4, 5, 6, 7, 8)}, n=100, seed=s),
                              samples=1000).gain for s in range(100))
    assert claims <= 10
    sel = select_alpha(table({a: 0.0 for a in (0, 1, 2, 3)}), samples=1000)
    assert sel.interval_level == pytest.approx(1 - 0.05 / 3)


def test_shared_prompts_and_shared_resamples():
    rewards = table({0.0: 0.0, 1.0: 1.0, 2.0: 1.2}, n=300)
    rewards[0.0] = rewards[0.0][:40]  # alpha 0 seen on the first 40 prompts only (as in a search)
    sel = select_alpha(rewards, candidates=[1.0, 2.0])
    assert sel.points[1.0].n == 300 and sel.points[0.0].n == 40
    gain = rewards[1.0][:40] - rewards[0.0]
    assert sel.points[1.0].gain == pytest.approx(gain.mean())
    # The same data and seed give the same intervals; equal differences give equal intervals.
    again = select_alpha(rewards, candidates=[1.0, 2.0])
    assert again.points == sel.points
    shifted = select_alpha({0.0: np.zeros(50), 1.0: np.arange(50.0), 2.0: np.arange(50.0) + 7})
    p1, p2 = shifted.points[1.0], shifted.points[2.0]
    assert (p2.gain_low - p1.gain_low, p2.gain_high - p1.gain_high) == pytest.approx((7, 7))


def test_runner_up_and_no_baseline():
    rewards = table({0.0: 0.0, 1.0: 0.5, 2.0: 1.5, 4.0: 0.7})
    sel = select_alpha(rewards)
    # Without alpha 2, alphas 1 and 4 are within noise of each other: the smaller one.
    assert sel.recommended == 2.0 and runner_up(rewards, sel) == 1.0
    assert runner_up({0.0: [1.0, 2.0], 1.0: [0.0, 1.0]}, select_alpha({0.0: [1.0, 2.0], 1.0: [0.0, 1.0]})) == 1.0
    no_zero = select_alpha({a: r for a, r in rewards.items() if a}, candidates=[1.0, 4.0])
    assert no_zero.case == NO_BASELINE and no_zero.best == 4.0 and no_zero.recommended == 1.0
    with pytest.raises(ValueError, match="finite"):
        select_alpha({0.0: [1.0, float("nan")]})
