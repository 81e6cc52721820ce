"""`expo-ray sweep SPEC`: extrapolate and evaluate many model pairs in one Ray job.

Pairs run in parallel (their shard tasks and engines share the cluster); finished work is never
redone: variant folders are named by deterministic ids of their inputs, committed manifests are
the truth, and evaluation results are cached by (model, prompts, sampling, reward model).
Layout under the destination:

    DEST/leaderboard.json, leaderboard.md, leaderboard.png   best alpha and reward gain per pair
    DEST/PAIR-ID/variants/alpha_*/                          committed variants (see README)
    DEST/PAIR-ID/variants/eval/SET-ID/                      responses, rewards, report per prompt set
    DEST/PAIR-ID/variants/search/                           adaptive search report (pairs with mode: search)

A pair with ``mode: search`` is searched on one hot-swapping engine (see
:mod:`expo_ray.alpha_search.driver`); only its chosen alpha is materialized, then evaluated like a grid
pair's variants, so the leaderboard compares both kinds on the same footing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import ExpoError
from ..evaluation.adapter_generation import evaluable_plan
from ..lora.plan import make_plan
from ..publish.destination import check_destination, check_no_overlap
from ..publish.run import run_plan
from ..storage import open_storage
from .spec import PairSpec, SweepSpec

log = logging.getLogger("expo_ray")


@dataclass
class PairOutcome:
    pair: PairSpec
    variants_uri: str
    extrapolated: dict = field(default_factory=dict)
    reports: list = field(default_factory=list)
    work_done: bool = False


def check_sweep(spec: SweepSpec) -> dict:
    """Open and validate every pair before anything runs (missing or mismatched models, outputs
    that would land on an input, an unwritable destination): all problems listed at once.
    Returns each pair's plan by folder."""
    dest = spec.destination.rstrip("/")
    plans, problems = {}, []
    for pair in spec.pairs:
        try:
            plans[pair.folder] = (evaluable_plan if spec.evaluation is not None else make_plan)(
                pair.sft, pair.aligned, pair.alphas, pair.plan)
            check_no_overlap(open_storage(f"{dest}/{pair.folder}/variants"), plans[pair.folder].sources)
        except ExpoError as exc:
            problems.append(f"pair {pair.name!r}: {exc}")
    if problems:
        raise ExpoError(f"{spec.path}: sweep not started:\n  " + "\n  ".join(problems))
    check_destination(spec.destination)
    return plans


def run_sweep(spec: SweepSpec, *, address: str | None = None, show_progress: bool = True,
              max_parallel_pairs: int = 4) -> dict:
    began = time.perf_counter()
    plans = check_sweep(spec)
    from ..cluster.ray_runtime import ensure_ray

    ensure_ray(address)
    dest = spec.destination.rstrip("/")

    def one_pair(pair: PairSpec) -> PairOutcome:
        outcome = PairOutcome(pair, f"{dest}/{pair.folder}/variants")
        plan = plans[pair.folder]
        if pair.mode == "search":
            plan = dataclasses.replace(plan, alphas=(_search_pair(spec, pair, outcome, address),))
        result = run_plan(plan, outcome.variants_uri, write=spec.write, address=address,
                          show_progress=show_progress and len(spec.pairs) == 1)
        outcome.extrapolated = result.variants
        outcome.work_done |= any(v == "written" for v in result.variants.values())
        if spec.evaluation is not None:
            outcome.reports = _evaluate_pair(spec, outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel_pairs, len(spec.pairs)))) as pool:
        outcomes = list(pool.map(one_pair, spec.pairs))
    board = leaderboard(outcomes)
    board["seconds"] = round(time.perf_counter() - began, 1)
    board["work_done"] = any(o.work_done for o in outcomes)
    _write_leaderboard(open_storage(dest), board)
    return board


def _search_pair(spec: SweepSpec, pair: PairSpec, outcome: PairOutcome, address: str | None) -> float:
    """The alpha an adaptive search chose for this pair (on the first prompt set); a finished
    search (its search.json) is reused."""
    from ..alpha_search.driver import search_alpha
    from ..evaluation.prompts import prompts_from_options
    from ..options import SearchOptions

    store = open_storage(outcome.variants_uri)
    if store.exists("search/search.json"):
        return float(json.loads(store.read_bytes("search/search.json"))["best"]["alpha"])
    e = spec.evaluation
    prompts = prompts_from_options(e.prompts[0])
    # Pairs run in parallel: a search holding two engines while another waits for its second could
    # wait forever on a small cluster, so with several pairs the engines of a search take turns.
    report = search_alpha(pair.sft, pair.aligned, prompts, e.reward_model, out_uri=outcome.variants_uri,
                          sampling=e.sampling, engine=pair.engine(e), plan=pair.plan, address=address,
                          search=SearchOptions(grid=pair.alphas, budget=pair.budget,
                                               time_share=True if len(spec.pairs) > 1 else None))
    outcome.work_done = True
    log.info("%s: search chose alpha %g after %d "
             "generations", pair.name, report["best"]["alpha"], report["generations"])
    return float(report["best"]["alpha"])


def _evaluate_pair(spec: SweepSpec, outcome: PairOutcome) -> list[dict]:
    from ..evaluation.pipeline import evaluate_variants
    from ..evaluation.prompts import prompts_from_options

    e = spec.evaluation
    reports = []
    for ps in e.prompts:
        report = evaluate_variants(outcome.variants_uri, prompts_from_options(ps), e.reward_model, sampling=e.sampling,
                                   engine=outcome.pair.engine(e),
                                   include_sft=e.include_sft, title=outcome.pair.name)
        outcome.work_done |= report.get("work_done", False)
        reports.append(report)
    return reports


def leaderboard(outcomes: list[PairOutcome]) -> dict:
    rows = []
    for o in outcomes:
        base = {"pair": o.pair.name, "id": o.pair.pair_id, "sft": o.pair.sft, "aligned": o.pair.aligned,
                "variants": o.variants_uri, "alphas": list(o.pair.alphas)}
        if not o.reports:
            rows.append(base)
        for r in o.reports:
            aligned = next((x for x in r["results"] if x["alpha"] == 0.0), None)
            rows.append({**base, "prompts": r["prompt_set"], "best_alpha": r["best"]["alpha"],
                         "best_reward": r["best"]["mean_reward"],
                         "aligned_reward": aligned["mean_reward"] if aligned else None,
                         "gain": r["best"]["gain_vs_aligned"],
                         "significant_gain": r.get("selection", {}).get("significant_gain"),
                         "report": f"{r['location']}/report.md"})
    return {"format": "expo-ray.leaderboard/1", "pairs": rows}


def _write_leaderboard(store, board: dict) -> None:
    store.write_bytes("leaderboard.json", (json.dumps(board, indent=2) + "\n").encode())
    lines = ["# ExPO sweep leaderboard", "",
             "Best alpha: the recommended one (the smallest alpha tied with the highest mean; alpha 0 when no "
             "alpha beats alpha 0 beyond its paired interval).", "",
             "| pair | prompts | best alpha | best reward | alpha=0 reward | gain | significant | report |",
             "|---|---|---|---|---|---|---|---|"]
    def fmt(v) -> str:
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    for r in board["pairs"]:
        significant = {None: "-", True: "yes", False: "no"}[r.get("significant_gain")]
        lines.append(f"| {r['pair']} | {r.get('prompts', '-')} | {fmt(r.get('best_alpha'))} | "
                     f"{fmt(r.get('best_reward'))} | "
                     f"{fmt(r.get('aligned_reward'))} | {fmt(r.get('gain'))} | {significant} | "
                     f"{r.get('report', r['variants'])} |")
    store.write_bytes("leaderboard.md", ("\n".join(lines) + "\n").encode())
    scored = [r for r in board["pairs"] if r.get("gain") is not None]
    if scored:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..evaluation.report import figure_png

        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(scored)), 3.4), dpi=120)
        ax.bar([f"{r['pair']}\n{r['prompts']}" for r in scored], [r["gain"] for r in scored])
        for i, r in enumerate(scored):
            ax.annotate(f"alpha={r['best_alpha']:g}", (i, r["gain"]), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("reward gain of the recommended alpha over alpha=0")
        store.write_bytes("leaderboard.png", figure_png(fig))
