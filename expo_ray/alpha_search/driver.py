"""`expo-ray search`: find the best alpha with one running engine, then materialize only the winner.

    one generation engine (started on the aligned model, swappable)
      -> for each alpha the search asks for: theta(alpha) computed in the engine's workers and
         swapped in place (no storage writes, no restart), answers for the prompts not yet done
      -> one reward engine scores them
    adaptive schedule (:mod:`.adaptive`) -> search.json / search.md / search.png
      -> the chosen alpha (and optionally the runner-up) extrapolated to storage, committed and
         verified like any `expo-ray extrapolate` run

Prompts are shuffled once (seeded), so "the first n prompts" is a fair sample for every n; with a
sampling seed each answer depends only on its prompt and the weights, so extending a point to
more prompts keeps its earlier answers.
"""
from __future__ import annotations

import json
import logging
import random
import time

from ..checkpoint.identity import checkpoint_identity
from ..cluster.ray_runtime import ensure_ray
from ..errors import ExpoError
from ..evaluation.engine.actors import Engines, plan_for
from ..evaluation.engine.vllm_engine import SwapNotFaithful
from ..evaluation.engine.vllm_support import installed_version, resolve_swap
from ..evaluation.models import ModelRef, model_config
from ..evaluation.pipeline import fitting_prompts
from ..evaluation.prompts import PromptSet
from ..evaluation.report import describe_swaps
from ..evaluation.selection import describe
from ..lora.adapter import is_adapter
from ..lora.plan import make_plan
from ..options import EngineOptions, PlanOptions, SamplingOptions, SearchOptions, variant_name
from ..publish.manifest import verify_variant
from ..publish.run import run_plan
from ..storage import open_storage
from .adaptive import SearchOutcome, adaptive_search, point_stats, search_settings
from .lora_evaluator import LoraEvaluator

log = logging.getLogger("expo_ray")


class _Evaluator:
    """evaluate(alpha, n) for :func:`adaptive_search`, on one swappable engine and one reward engine.

    When the cluster cannot hold both engines at once (``time_share``) they take turns: a round's
    answers are generated (``prefetch``, one swap per alpha), the generation engine is closed, the
    reward engine scores the round and is closed in turn. Holding at most one engine at a time,
    searches never wait on each other for GPUs (two searches each holding a generation engine and
    waiting for a reward engine would wait forever).
    """

    def __init__(self, ray, sft: str, aligned: str, texts: list[str], reward_model: str, sampling: SamplingOptions,
                 engines: Engines, plan: PlanOptions, time_share: bool):
        self.ray, self.sft, self.aligned, self.texts = ray, sft, aligned, texts
        self.sampling, self.plan = sampling.to_dict(), plan.to_dict()
        self.engines, self.reward_model, self.time_share = engines, reward_model, time_share
        self.generator = self.scorer = None
        self.answers: dict[float, list[dict]] = {}
        self.serving: float | None = None
        self.swap_seconds: list[float] = []
        self.swap_record = {"check": None, "checked": 0, "architecture": None}
        self.generate_seconds = 0.0
        if not time_share:
            self._generator(), self._scorer()

    @property
    def engine_starts(self) -> int:
        return self.engines.started

    def _generator(self):
        if self.generator is None:
            if self.scorer is not None and self.time_share:
                self.engines.stop(self.scorer)
                self.scorer = None
            aligned = self.aligned
            identity = checkpoint_identity(aligned) if "://" in aligned else None
            self.generator = self.engines.generation(aligned, identity, swappable=True, label="the aligned model")
            self.serving = None
        return self.generator

    def _scorer(self):
        if self.scorer is None:
            if self.generator is not None and self.time_share:
                self.engines.stop(self.generator)
                self.generator = None
            self.scorer = self.engines.reward(self.reward_model)
        return self.scorer

    def _generate(self, alpha: float, n: int) -> list[dict]:
        ray, generator = self.ray, self._generator()
        if self.serving != alpha:
            try:
                info = ray.get(generator.serve_extrapolated.remote(self.sft, self.aligned, alpha, self.plan))
            except SwapNotFaithful as exc:
                raise ExpoError(f"{getattr(exc, 'cause', exc)}: expo-ray search evaluates alphas by swapping "
                                "weights; evaluate this model with `expo-ray run` (one engine per variant)") from None
            self.swap_seconds.append(info["seconds"])
            swap = info.get("swap") or {}
            self.swap_record.update(check=swap.get("check"), architecture=swap.get("architecture"),
                                    checked=self.swap_record["checked"] + (1 if info.get("check") else 0))
            self.serving = alpha
        began = time.perf_counter()
        generations = ray.get(generator.generate.remote(self.texts[len(self.answers.get(alpha, [])):n], self.sampling))
        self.generate_seconds += time.perf_counter() - began
        return generations

    def _score(self, alpha: float, generations: list[dict]) -> None:
        done = self.answers.setdefault(alpha, [])
        new = self.texts[len(done):len(done) + len(generations)]
        rewards = self.ray.get(self._scorer().score.remote(new, [g["output"] for g in generations]))
        done.extend({**g, "reward": r} for g, r in zip(generations, rewards))

    def prefetch(self, requests: list[tuple[float, int]]) -> None:
        """Generate a whole round, then score it (engines taking turns); no-op when both are held."""
        if not self.time_share:
            return
        rounds = [(alpha, self._generate(alpha, n)) for alpha, n in requests]
        for alpha, generations in rounds:
            self._score(alpha, generations)

    def __call__(self, alpha: float, n: int) -> list[float]:
        if len(self.answers.get(alpha, [])) < n:
            self._score(alpha, self._generate(alpha, n))
        return [a["reward"] for a in self.answers[alpha]]

    def close(self) -> None:
        self.engines.close()
        self.generator = self.scorer = None


def search_alpha(sft: str, aligned: str, prompts: PromptSet, reward_model: str, *, out_uri: str,
                 sampling: SamplingOptions = SamplingOptions(), engine: EngineOptions = EngineOptions(),
                 search: SearchOptions = SearchOptions(), plan: PlanOptions = PlanOptions(),
                 address: str | None = None) -> dict:
    """Run the adaptive search; write search.json/md/png under ``out_uri/search``; return the report."""
    from ..evaluation.engine.vllm_engine import check_reward_model

    began = time.perf_counter()
    # Everything that can be refused is checked before any engine starts.
    search_settings(search.grid, len(prompts.prompts), search.budget, search.initial_prompts)
    adapter = is_adapter(aligned)  # a LoRA adapter: one multi-LoRA engine, an adapter per probed alpha
    make_plan(sft, aligned, (1.0,), plan)
    check_reward_model(reward_model, engine.trust_remote_code, model_config(reward_model))
    engine.export_cache_settings()
    prompts, skipped = fitting_prompts([ModelRef("aligned", 0.0, aligned, "", sft if adapter else None)], prompts,
                                       engine)
    order = list(range(len(prompts.prompts)))
    random.Random(search.shuffle_seed).shuffle(order)
    texts = [prompts.prompts[i].text for i in order]

    if not adapter:
        resolve_swap(engine.swap, installed_version(), needed_by="expo-ray search")
    ray = ensure_ray(address)
    placement = plan_for(ray, engine)
    time_share = (not placement.together) if search.time_share is None else search.time_share
    if time_share:
        log.info("the generation and the reward engine take turns (the cluster cannot hold both at once)")
    engines = Engines(ray, engine, placement, f"{open_storage(out_uri).child('search').uri.rstrip('/')}/logs")
    evaluator = (LoraEvaluator if adapter else _Evaluator)(ray, sft, aligned, texts, reward_model, sampling, engines,
                                                          plan, time_share)
    try:
        outcome = adaptive_search(evaluator, search.grid, len(texts), budget=search.budget,
                                  initial=search.initial_prompts, refine_steps=search.refine_steps, log=log.info)
    finally:
        evaluator.close()
    report = _report(outcome, evaluator, {
        "sft": sft, "aligned": aligned, "prompts": prompts.source, "prompt_set": prompts.name,
        "n_prompts": len(texts), "reward_model": reward_model, "sampling": sampling.to_dict(),
        "grid": list(search.grid), "tensor_parallel_size": engine.tp, "skipped_prompts": skipped,
    })
    report["seconds"] = round(time.perf_counter() - began, 1)
    out = open_storage(out_uri).child("search")
    _write(out, report, evaluator, prompts, order)
    report["location"] = out.uri
    return report


def _report(outcome: SearchOutcome, evaluator: _Evaluator, context: dict) -> dict:
    points = []
    for alpha in sorted(outcome.points):
        stats = point_stats(outcome.points[alpha])
        answers = evaluator.answers.get(alpha, [])
        stats["mean_tokens"] = sum(a["tokens"] for a in answers) / len(answers) if answers else None
        paired = outcome.selection.points.get(alpha)
        stats.update({"gain_vs_aligned": paired.gain, "gain_ci_low": paired.gain_low, "gain_ci_high": paired.gain_high,
                      "win_rate_vs_aligned": paired.win_rate, "tied_with_best": paired.tied_with_best}
                     if paired else {"gain_vs_aligned": None, "tied_with_best": None})
        points.append(stats)
    swaps = evaluator.swap_seconds
    return {
        "format": "expo-ray.search/1", **context,
        "best": {"alpha": outcome.best, **next(p for p in points if p["alpha"] == outcome.best)},
        "runner_up": outcome.runner_up,
        "selection": {**outcome.selection.summary(), "statement": describe(outcome.selection)},
        "generations": outcome.generations, "budget": outcome.budget,
        "grid_generations": outcome.grid_generations,
        "swaps": len(swaps), "swap_seconds_mean": round(sum(swaps) / len(swaps), 3) if swaps else None,
        "weight_swaps": None if evaluator.swap_record is None else {"swaps": len(swaps), **evaluator.swap_record},
        "engines_take_turns": evaluator.time_share, "engine_starts": evaluator.engine_starts,
        "generate_seconds": round(evaluator.generate_seconds, 1),
        "points": points,
    }


def _write(out, report: dict, evaluator: _Evaluator, prompts: PromptSet, order: list[int]) -> None:
    report["plot"] = "search.png"
    out.write_bytes("search.png", plot_search(report))
    out.write_bytes("search.json", json.dumps(report, indent=2).encode())
    out.write_bytes("search.md", search_markdown(report).encode())
    for alpha, answers in evaluator.answers.items():
        lines = [json.dumps({"prompt_id": prompts.prompts[i].id, "prompt": prompts.prompts[i].text, **a})
                 for i, a in zip(order, answers)]
        out.write_bytes(f"responses/alpha_{alpha:g}.jsonl", ("\n".join(lines) + "\n").encode())


def search_markdown(report: dict) -> str:
    best = report["best"]
    lines = [
        "# ExPO adaptive alpha search", "",
        f"- sft: `{report['sft']}`", f"- aligned: `{report['aligned']}`",
        f"- prompts: `{report['prompts']}` ({report['n_prompts']})", f"- reward model: `{report['reward_model']}`",
        f"- generations: {report['generations']} of a budget of {report['budget']} "
        f"(the full grid would take {report['grid_generations']})",
        *([f"- weight swaps: {describe_swaps(report['weight_swaps'])}"] if report.get("weight_swaps") else []),
        "", f"**Recommended alpha: {best['alpha']:g}** (mean reward {best['mean_reward']:.3f} on {best['n']} prompts"
        + (f"; runner-up {report['runner_up']:g})" if report.get("runner_up") is not None else ")"), "",
        f"Selection: {report['selection']['statement']}. Paired statistics use the prompts both points share.", "",
        "| alpha | prompts | mean reward | 95% CI | gain vs alpha=0 (paired) | tied with best | mean tokens | added in "
        "|",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        tokens = "-" if p["mean_tokens"] is None else f"{p['mean_tokens']:.1f}"
        gain = "-" if p.get("gain_vs_aligned") is None else \
            f"{p['gain_vs_aligned']:+.3f} [{p['gain_ci_low']:+.3f}, {p['gain_ci_high']:+.3f}]"
        tied = {None: "-", True: "yes", False: "no"}[p.get("tied_with_best")]
        lines.append(f"| {p['alpha']:g} | {p['n']} | {p['mean_reward']:.3f} | [{p['ci_low']:.3f}, {p['ci_high']:.3f}] "
                     f"| {gain} | {tied} | {tokens} | {p['phase']} |")
    return "\n".join(lines + ["", f"![reward against alpha]({report['plot']})", ""])


def plot_search(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.report import figure_png

    points = report["points"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    largest = max(p["n"] for p in points)
    for p in points:
        error = [[p["mean_reward"] - p["ci_low"]], [p["ci_high"] - p["mean_reward"]]]
        ax.errorbar([p["alpha"]], [p["mean_reward"]], yerr=error,
                    marker="o", markersize=3 + 7 * p["n"] / largest, capsize=3,
                    color="tab:red" if p["alpha"] == report["best"]["alpha"] else "tab:blue")
    ax.set_xlabel("alpha")
    ax.set_ylabel("mean reward (95% CI)")
    ax.set_title(f"adaptive search: {report['generations']} generations (grid: {report['grid_generations']})",
                 fontsize=9)
    return figure_png(fig)


def materialize(sft: str, aligned: str, alphas: list[float], out_uri: str, *, plan: PlanOptions = PlanOptions(),
                address: str | None = None, show_progress: bool = True) -> list[str]:
    """Extrapolate, commit and verify the chosen alphas under ``out_uri`` (for a LoRA adapter: adapter
    variants, or model folders with ``plan.merge``); returns the variant URIs."""
    run_plan(make_plan(sft, aligned, alphas, plan), out_uri, address=address, show_progress=show_progress)
    root = open_storage(out_uri)
    uris = []
    for alpha in alphas:
        store = root.child(variant_name(alpha))
        check = verify_variant(store)
        if not check.ok:
            raise ExpoError(f"{store.describe()}: does not match its manifest: {check.problems[0]}")
        uris.append(store.uri)
    return uris
