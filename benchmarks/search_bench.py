"""Adaptive search against the full grid, on the demo's controlled setting.

Needs a finished `expo-ray demo` (its models and its grid evaluation, in demo-summary.json). For
each DPO model it runs `expo-ray search` over the same alpha grid, prompts, sampling and reward
model with a budget of half the grid's generations, then measures the chosen alpha's mean reward
on ALL prompts (from the grid's results when the alpha is on the grid, otherwise by materializing
and evaluating it) and checks it against the grid-best's 95% bootstrap interval.

    .venv/bin/python benchmarks/search_bench.py --workdir expo-demo

Prints a markdown table: grid best (alpha, mean, CI), search choice, its all-prompt mean, whether
that lies within the grid best's interval, generations used by each, and wall times.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="expo-demo", help="The demo's workdir (after `expo-ray demo`).")
    parser.add_argument("--models", default="dpo_small,dpo_large")
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from expo_ray.alpha_search.driver import materialize, search_alpha
    from expo_ray.evaluation.pipeline import evaluate_variants
    from expo_ray.evaluation.prompts import load_prompts
    from expo_ray.options import EngineOptions, SamplingOptions, SearchOptions

    summary = json.loads((Path(args.workdir) / "demo-summary.json").read_text())
    prompts = load_prompts(summary["models"]["prompts"])
    settings = EngineOptions(dtype="float32", max_model_len=256)
    n = len(prompts.prompts)
    rows = []
    for name in args.models.split(","):
        grid = {r["alpha"]: r for r in summary["dpo"][name]["results"] if r["alpha"] is not None}
        best = max(grid.values(), key=lambda r: (r["mean_reward"], -r["alpha"]))
        budget = int(len(grid) * n * args.budget_fraction)
        out = tempfile.mkdtemp(prefix=f"search-bench-{name}-")
        began = time.perf_counter()
        report = search_alpha(summary["models"]["sft"], summary["models"][name], prompts, summary["models"]["reward"],
                              out_uri=out, sampling=SamplingOptions(**summary["sampling"]), engine=settings,
                              search=SearchOptions(grid=tuple(sorted(grid)), budget=budget))
        search_s = time.perf_counter() - began
        chosen = report["best"]["alpha"]
        if chosen in grid:
            full = grid[chosen]["mean_reward"]
        else:
            materialize(summary["models"]["sft"], summary["models"][name], [chosen], out, show_progress=False)
            evaluated = evaluate_variants(out, prompts, summary["models"]["reward"],
                                          sampling=SamplingOptions(**summary["sampling"]), engine=settings)
            full = next(r["mean_reward"] for r in evaluated["results"] if r["alpha"] == chosen)
        rows.append((name, best, chosen, full, report["generations"], len(grid) * n, search_s,
                     summary["dpo"][name].get("eval_seconds")))
    print(f"\n{n} prompts; search budget {args.budget_fraction:g} of the grid's generations\n")
    print("| model | grid best alpha | grid best mean [95% CI] | search alpha | its mean on all prompts | within CI | "
          "generations (search / grid) | search wall s | grid eval wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, best, chosen, full, used, grid_gens, search_s, grid_s in rows:
        within = best["ci_low"] <= full <= best["ci_high"] or full >= best["mean_reward"]
        print(f"| {name} | {best['alpha']:g} | "
              f"{best['mean_reward']:.3f} [{best['ci_low']:.3f}, {best['ci_high']:.3f}] | "
              f"{chosen:g} | {full:.3f} | {'yes' if within else 'NO'} | {used} / {grid_gens} | {search_s:.0f} | "
              f"{'-' if grid_s is None else f'{grid_s:.0f}'} |")


if __name__ == "__main__":
    main()
