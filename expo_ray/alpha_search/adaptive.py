"""Adaptive alpha search: which alphas to evaluate on how many prompts, within a generation budget.

Pure logic, no Ray or vLLM: :func:`adaptive_search` drives a callback ``evaluate(alpha, n)`` that
must return the rewards of theta(alpha) on the first ``n`` prompts (a fixed, shuffled order, so a
point extended to more prompts keeps the answers it has). Every generation counts against the
budget. The schedule:

1. **Successive halving** over the coarse grid: every candidate on ``initial`` prompts, then the
   better half (by mean reward) on twice as many, until two remain.
2. **Refinement** around the best point: midpoints towards its evaluated neighbours (or a step
   past it when it is the grid's top, bracketing the optimum), at the current prompt count, for
   ``refine_steps`` rounds.
3. **Confirmation**: what budget is left extends the two best points towards all prompts.

The winner and the runner-up follow :mod:`.selection`'s rule among the points evaluated on the
most prompts (so the winner is never chosen on less evidence than its closest rival), paired on
the prompts both points share, with alpha 0 as the baseline wherever the grid has it.

Before each round the callback's optional ``prefetch(requests)`` is given the round's
``(alpha, n)`` requests that fit the budget, so an evaluator whose generation and reward engines
take turns can generate the whole round, then score it, instead of switching per point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..evaluation.aggregate import bootstrap_ci
from ..evaluation.selection import Selection, runner_up, select_alpha


@dataclass
class Point:
    alpha: float
    rewards: list[float] = field(default_factory=list)
    phase: str = "grid"

    @property
    def n(self) -> int:
        return len(self.rewards)

    @property
    def mean(self) -> float:
        return float(np.mean(self.rewards)) if self.rewards else float("nan")


@dataclass
class SearchOutcome:
    points: dict[float, Point]
    best: float
    runner_up: float | None
    generations: int
    budget: int
    grid_generations: int
    selection: Selection | None = None


class _Budget(Exception):
    pass


def default_budget(grid: Sequence[float], n_prompts: int) -> int:
    """Half of what the full grid would cost (every alpha on every prompt)."""
    return len(grid) * n_prompts // 2


def _ranked(points: list[Point], n: int) -> list[Point]:
    return sorted(points, key=lambda p: (-float(np.mean(p.rewards[:n])), p.alpha))


def search_settings(grid: Sequence[float], n_prompts: int, budget: int | None = None,
                    initial: int | None = None) -> tuple[list[float], int, int]:
    """The sorted grid, the budget and the first round's prompt count, with defaults filled in;
    ValueError when they cannot work (checked before any engine starts)."""
    grid = sorted({float(a) for a in grid})
    if len(grid) < 2:
        raise ValueError("the coarse grid needs at least two alphas")
    if n_prompts < 2:
        raise ValueError("the search needs at least two prompts")
    budget = default_budget(grid, n_prompts) if budget is None else int(budget)
    initial = max(2, min(n_prompts, initial or math.ceil(n_prompts / 8)))
    if budget < len(grid) * initial:
        raise ValueError(f"a budget of {budget} generations cannot evaluate the {len(grid)}-point grid on "
                         f"{initial} prompts each; give at least {len(grid) * initial}")
    return grid, budget, initial


def adaptive_search(evaluate: Callable[[float, int], Sequence[float]], grid: Sequence[float], n_prompts: int,
                    budget: int | None = None, initial: int | None = None, refine_steps: int = 2,
                    log: Callable[[str], None] = lambda message: None) -> SearchOutcome:
    """Search ``grid`` (and refinements) for the alpha with the highest mean reward; see the module."""
    grid, budget, initial = search_settings(grid, n_prompts, budget, initial)
    points: dict[float, Point] = {}
    spent = 0

    def run(alpha: float, n: int, phase: str) -> Point:
        nonlocal spent
        point = points.get(alpha) or Point(alpha, phase=phase)
        n = min(n, n_prompts)
        if n <= point.n:
            return point
        if spent + (n - point.n) > budget:
            raise _Budget
        points[alpha] = point
        rewards = list(evaluate(alpha, n))
        if len(rewards) != n:
            raise RuntimeError(f"evaluate({alpha}, {n}) returned {len(rewards)} rewards")
        spent += n - point.n
        point.rewards = rewards
        log(f"{phase}: alpha {alpha:g} on {n} prompts: mean reward {point.mean:.4f} "
            f"({spent}/{budget} generations)")
        return point

    def prefetch(requests: list[tuple[float, int]]) -> None:
        wanted, total = [], spent
        for alpha, n in requests:
            n, have = min(n, n_prompts), points[alpha].n if alpha in points else 0
            if n <= have:
                continue
            if total + n - have > budget:
                break
            total += n - have
            wanted.append((alpha, n))
        if wanted and hasattr(evaluate, "prefetch"):
            evaluate.prefetch(wanted)

    n = initial
    prefetch([(a, n) for a in grid])
    candidates = [run(a, n, "grid") for a in grid]
    try:
        while len(candidates) > 2:
            candidates = _ranked(candidates, n)[:math.ceil(len(candidates) / 2)]
            n = min(n_prompts, 2 * n)
            prefetch([(p.alpha, n) for p in candidates])
            candidates = [run(p.alpha, n, "halving") for p in candidates]
        for _ in range(refine_steps):
            best = _ranked([p for p in points.values() if p.n >= n], n)[0]
            refinements = _refinements(best.alpha, sorted(points))
            prefetch([(alpha, n) for alpha in refinements])
            for alpha in refinements:
                run(alpha, n, "refine")
        while True:  # confirmation: the two best points on more prompts, as the budget allows
            top = _ranked([p for p in points.values() if p.n >= n], n)[:2]
            if n >= n_prompts:
                break
            n = min(n_prompts, 2 * n)
            prefetch([(p.alpha, n) for p in top])
            for p in top:
                run(p.alpha, n, "confirm")
    except _Budget:
        log(f"budget of {budget} generations reached")
    rewards = {a: p.rewards for a, p in points.items()}
    most = max(p.n for p in points.values())
    finalists = [a for a, p in points.items() if p.n == most]
    chosen = select_alpha(rewards, candidates=finalists)
    second = runner_up(rewards, chosen, candidates=finalists + ([0.0] if 0.0 in points else []))
    return SearchOutcome(points, chosen.recommended, second, spent, budget, len(grid) * n_prompts, chosen)


def _refinements(best: float, evaluated: list[float]) -> list[float]:
    """New alphas bracketing ``best``: midpoints towards its evaluated neighbours, or one step
    beyond it when no evaluated alpha is larger."""
    lower = [a for a in evaluated if a < best]
    upper = [a for a in evaluated if a > best]
    out = []
    if lower:
        out.append((lower[-1] + best) / 2)
    if upper:
        out.append((best + upper[0]) / 2)
    elif lower:
        out.append(best + (best - lower[-1]))
    return [round(a, 6) for a in out if round(a, 6) not in evaluated]


def point_stats(point: Point) -> dict:
    """Mean reward with its 95% bootstrap interval, for reports."""
    low, high = bootstrap_ci(np.asarray(point.rewards, dtype=np.float64))
    return {"alpha": point.alpha, "n": point.n, "mean_reward": point.mean, "ci_low": low, "ci_high": high,
            "phase": point.phase}
