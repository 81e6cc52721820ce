"""`expo-ray demo`: the ExPO paper's controlled experiment in miniature, end to end on one CPU.

1. Models (built once, then cached in WORKDIR/models): a synthetic instruction task with a known
   preference, a tiny SFT model, DPO models trained from it on a small and a large share of the
   preference pairs, and a Bradley-Terry reward model (:mod:`expo_ray.demo.train`).
2. Storage: an embedded S3 server (SeaweedFS on loopback, data in WORKDIR/s3, started and stopped
   here), or a local folder with ``storage="local"``.
3. For each DPO model: lineage check, extrapolation of the alpha grid on a local Ray, evaluation
   with vLLM on CPU (one engine swapping weights from variant to variant, one reward engine),
   report with bootstrap intervals.
4. WORKDIR/results: each model's report, a combined table (demo-report.md), a plot (demo.png) and
   whether the paper's finding shows (demo-summary.json).

Everything is cached where it lives (models on disk, variants and evaluation results in storage),
so a second run redoes nothing but the summary.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from ..errors import ExpoError

log = logging.getLogger("expo_ray")

# The under-trained model's DPO delta is small: it improves up to about alpha 8, overshoots the
# task's target beyond, and breaks down only far out (the well-trained model much sooner).
DEMO_ALPHAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 1024.0)
# The paper's sampling (temperature 0.7, top-p 0.9, top-k 50, penalties 0.1, seed 42); a good
# answer is 11 tokens, so a short limit: what runs past it is malformed anyway.
EVAL_SAMPLING = {"max_tokens": 32}
DPO_MODELS = ("dpo_small", "dpo_large")
BUCKET = "expo-demo"


@contextlib.contextmanager
def _storage_root(workdir: Path, storage: str):
    """The URI variants go to; with "s3", an embedded server whose settings are in the
    environment (before Ray starts, so its workers inherit them) until the block ends."""
    if storage == "local":
        yield str(workdir / "store")
        return
    if storage != "s3":
        raise ExpoError(f"demo storage {storage!r}: use s3 (an embedded server) or local")
    from ..storage.embedded_s3 import EmbeddedS3

    server = EmbeddedS3(workdir / "s3").start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        server.create_bucket(BUCKET)
        log.info("embedded S3 server at %s (data in %s)", server.endpoint, server.data_dir)
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _one_engine_thread():
    """vLLM on CPU runs one OpenMP thread per core it may use (all but one, by default): another
    thread count sums in another order, moves a float32 logit in its last digits and can change a
    sampled token. The demo's models are tiny, so its engines get one thread, on the first core
    this process may use, whatever the machine (unless the user set the binding). Set before Ray
    starts, so its workers inherit it."""
    name = "VLLM_CPU_OMP_THREADS_BIND"
    if os.environ.get(name):
        yield
        return
    os.environ[name] = str(min(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        os.environ.pop(name, None)


def finding(report: dict) -> dict:
    """Does the report show the paper's finding, by the selection rule's paired statistics?
    ``improves``: the recommended alpha is above 0 with a significant gain over alpha 0;
    ``large_alpha_degrades``: the largest alpha is below alpha 0 beyond its paired interval;
    ``falls_after_best``: some alpha above the highest mean is distinguishably below it (the
    curve turns down inside the grid)."""
    points = [r for r in report["results"] if r["alpha"] is not None]
    sel = report["selection"]
    rec = next(r for r in points if r["alpha"] == sel["recommended"])
    zero = next(r for r in points if r["alpha"] == 0.0)
    top = max(points, key=lambda r: r["alpha"])
    peak = next(r for r in points if r["alpha"] == sel["best_mean"])
    return {"best_alpha": rec["alpha"], "best_reward": rec["mean_reward"], "alpha0_reward": zero["mean_reward"],
            "gain": rec["gain_vs_aligned"], "gain_low": rec["gain_ci_low"], "gain_high": rec["gain_ci_high"],
            "highest_mean_alpha": peak["alpha"], "case": sel["case"], "largest_alpha": top["alpha"],
            "largest_alpha_reward": top["mean_reward"], "improves": bool(sel["significant_gain"] and rec["alpha"] > 0),
            "falls_after_best": any(r["alpha"] > peak["alpha"] and r["tied_with_best"] is False for r in points),
            "large_alpha_degrades": top["gain_ci_high"] is not None and top["gain_ci_high"] < 0}


def run_demo(workdir: str | Path, alphas=DEMO_ALPHAS, *, seed: int = 0, scale: str = "full", storage: str = "s3",
             show_progress: bool = True, progress=None) -> dict:
    """Run the demo in ``workdir``; returns the summary (also written to WORKDIR/demo-summary.json)."""
    from ..api import extrapolate, make_plan
    from ..evaluation.pipeline import evaluate_variants
    from ..evaluation.prompts import load_prompts
    from ..extrapolation.lineage import lineage, lineage_warnings
    from ..options import EngineOptions, SamplingOptions
    from .train import build_demo_models

    say = progress or log.info
    workdir = Path(workdir).resolve()
    began = time.perf_counter()
    say(f"models: {workdir / 'models'} (built once, then reused)")
    try:
        models = build_demo_models(workdir / "models", seed=seed, scale=scale, progress=progress)
    except FileExistsError as exc:
        raise ExpoError(f"{exc} (an older demo's models? remove the folder or pass another --workdir)") from None
    models_s = round(time.perf_counter() - began, 1)
    prompts = load_prompts(str(models["prompts"]))
    results_dir = workdir / "results"
    summary: dict = {"workdir": str(workdir), "seed": seed, "scale": scale, "storage": storage,
                     "alphas": list(alphas), "models": {k: str(v) for k, v in models.items()},
                     "prompts": len(prompts.prompts), "sampling": EVAL_SAMPLING, "dpo": {}}
    with _one_engine_thread(), _storage_root(workdir, storage) as root:
        for name in DPO_MODELS:
            sft, aligned = str(models["sft"]), str(models[name])
            groups, overall = lineage(make_plan(sft, aligned, (1.0,)))
            warnings = lineage_warnings(groups, overall)
            say(f"{name}: relative change from SFT {overall.relative:.4f}; extrapolating alphas "
                f"{', '.join(f'{a:g}' for a in alphas)}")
            variants = f"{root}/{scale}-seed{seed}/{name}"
            result = extrapolate(sft, aligned, alphas, variants, show_progress=show_progress)
            say(f"{name}: evaluating {len(alphas)} variants on {len(prompts.prompts)} prompts with vLLM "
                "(one engine, weights swapped in place per variant)")
            report = evaluate_variants(variants, prompts, str(models["reward"]),
                                       sampling=SamplingOptions(**EVAL_SAMPLING),
                                       engine=EngineOptions(dtype="float32", max_model_len=256),
                                       include_sft=True, title=f"demo {name}")
            _copy_report(report["location"], results_dir / name)
            summary["dpo"][name] = {
                "relative_change": overall.relative, "lineage_warnings": warnings, "variants": variants,
                "variants_written": sum(v == "written" for v in result.variants.values()),
                "report": str(results_dir / name / "report.md"), "results": report["results"],
                "best": report["best"], "selection": report["selection"], "finding": finding(report),
                "eval_seconds": report.get("seconds"),
            }
    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["models_seconds"] = models_s
    (results_dir).mkdir(parents=True, exist_ok=True)
    (results_dir / "demo.png").write_bytes(plot_demo(summary))
    (results_dir / "demo-report.md").write_text(demo_markdown(summary), encoding="utf-8")
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _copy_report(uri: str, dest: Path) -> None:
    """The report, plot and responses from storage to a local folder the user can open."""
    from ..storage import open_storage

    store = open_storage(uri)
    dest.mkdir(parents=True, exist_ok=True)
    for key in store.list():
        if key.startswith("cache/"):
            continue
        target = dest / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.read_bytes(key))


def demo_table(summary: dict) -> list[str]:
    """Markdown rows: reward and length against alpha for every DPO model, with the paired gain
    over alpha 0 and the recommended alpha marked."""
    lines = ["| model | alpha | mean reward | 95% CI | gain vs alpha=0, paired [CI] | mean tokens | win rate vs "
             "alpha=0 |",
             "|---|---|---|---|---|---|---|"]
    for name, d in summary["dpo"].items():
        for r in d["results"]:
            alpha = "SFT" if r["alpha"] is None else f"{r['alpha']:g}"
            mark = " **rec.**" if r.get("recommended") else ""
            win = "-" if r["win_rate_vs_aligned"] is None else f"{r['win_rate_vs_aligned']:.2f}"
            gain = "-" if r.get("gain_vs_aligned") is None else \
                f"{r['gain_vs_aligned']:+.3f} [{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}]"
            lines.append(f"| {name} | {alpha}{mark} | {r['mean_reward']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                         f"| {gain} | {r['mean_tokens']:.1f} | {win} |")
    return lines


def finding_lines(summary: dict) -> list[str]:
    out = []
    for name, d in summary["dpo"].items():
        f = d["finding"]
        out.append(f"- {name}: recommended alpha {f['best_alpha']:g} ({d['selection']['statement']}); highest mean at "
                   f"alpha {f['highest_mean_alpha']:g}, "
                   + ("then a fall beyond its "
                      "interval" if f["falls_after_best"] else "no fall beyond it within the grid")
                   + f"; alpha {f['largest_alpha']:g}: {f['largest_alpha_reward']:.3f} ("
                   + ("below alpha 0 beyond the interval" if f["large_alpha_degrades"] else "not clearly below alpha 0")
                   + ")")
    return out


def demo_markdown(summary: dict) -> str:
    lines = ["# expo-ray demo", "",
             f"{summary['prompts']} held-out prompts, one sampled answer each, scored by the demo's reward model "
             f"(seed {summary['seed']}, scale {summary['scale']}, storage {summary['storage']}).", ""]
    lines += demo_table(summary) + ["", *finding_lines(summary), "", "![reward and length against alpha](demo.png)", ""]
    return "\n".join(lines)


def plot_demo(summary: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.report import figure_png

    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for name, d in summary["dpo"].items():
        points = [r for r in d["results"] if r["alpha"] is not None]
        xs = [r["alpha"] for r in points]
        ax_r.errorbar(xs, [r["mean_reward"] for r in points],
                      yerr=[[r["mean_reward"] - r["ci_low"] for r in points],
                            [r["ci_high"] - r["mean_reward"] for r in points]],
                      marker="o", capsize=3, label=name)
        rec = next((r for r in points if r.get("recommended")), None)
        if rec is not None:
            ax_r.plot([rec["alpha"]], [rec["mean_reward"]], marker="*", markersize=14, color="black", linestyle="none",
                      label="recommended" if name == next(iter(summary["dpo"])) else None)
        ax_l.plot(xs, [r["mean_tokens"] for r in points], marker="s", label=name)
    sft = next((r for d in summary["dpo"].values() for r in d["results"] if r["alpha"] is None), None)
    if sft is not None:
        ax_r.axhline(sft["mean_reward"], color="gray", linestyle="--", label="SFT")
    for ax in (ax_r, ax_l):
        _alpha_axis(ax)
    ax_r.set_ylabel("mean reward (95% CI)")
    ax_r.legend(fontsize=8)
    ax_l.set_ylabel("mean response length (tokens)")
    ax_l.legend(fontsize=8)
    fig.suptitle("ExPO on the demo task: theta = dpo + alpha * (dpo - sft)", fontsize=10)
    return figure_png(fig)


def _alpha_axis(ax) -> None:
    """The x axis of reward-against-alpha plots: the demo's grid spans 0 to a few hundred."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("alpha (symmetric log scale)")
    ax.set_xlim(left=-0.1)


def run_demo_seeds(workdir: str | Path, seeds, alphas=DEMO_ALPHAS, *, scale: str = "full", storage: str = "s3",
                   show_progress: bool = True, progress=None) -> dict:
    """The demo once per seed (each in WORKDIR/seed-N, cached there like a single run), then one
    table and one plot of the recommended alpha and its gain over alpha 0 per seed
    (WORKDIR/seeds-summary.json, seeds-report.md, seeds.png)."""
    workdir = Path(workdir).resolve()
    began = time.perf_counter()
    runs = {}
    for seed in seeds:
        (progress or log.info)(f"seed {seed}: {workdir / f'seed-{seed}'}")
        runs[seed] = run_demo(workdir / f"seed-{seed}", alphas, seed=seed, scale=scale, storage=storage,
                              show_progress=show_progress, progress=progress)
    summary = {"workdir": str(workdir), "seeds": list(seeds), "scale": scale, "alphas": list(alphas),
               "rows": seeds_rows(runs), "seconds": round(time.perf_counter() - began, 1),
               "seconds_per_seed": {str(s): r["seconds"] for s, r in runs.items()}}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "seeds.png").write_bytes(plot_seeds(runs))
    (workdir / "seeds-report.md").write_text("\n".join(
        ["# expo-ray demo across "
         "seeds", "", *seeds_table(summary), "", "![recommended alpha per seed](seeds.png)", ""]),
        encoding="utf-8")
    (workdir / "seeds-summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    summary["runs"] = runs
    return summary


def seeds_rows(runs: dict) -> list[dict]:
    """Per seed and model: the recommended alpha, its paired gain over alpha 0, the rule's case."""
    rows = []
    for seed, summary in runs.items():
        for name, d in summary["dpo"].items():
            f = d["finding"]
            rows.append({"seed": seed, "model": name, "recommended_alpha": f["best_alpha"],
                         "highest_mean_alpha": f["highest_mean_alpha"], "alpha0_reward": f["alpha0_reward"],
                         "gain": f["gain"], "gain_low": f["gain_low"], "gain_high": f["gain_high"],
                         "significant_gain": d["selection"]["significant_gain"],
                         "large_alpha_degrades": f["large_alpha_degrades"]})
    return rows


def seeds_table(summary: dict) -> list[str]:
    lines = ["| model | seed | recommended alpha | highest mean at | reward at alpha 0 | gain, paired [CI] | "
             "significant "
             "| largest alpha below alpha 0 |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(summary["rows"], key=lambda r: (r["model"], r["seed"])):
        gain = "-" if r["gain"] is None else f"{r['gain']:+.3f} [{r['gain_low']:+.3f}, {r['gain_high']:+.3f}]"
        lines.append(f"| {r['model']} | {r['seed']} | {r['recommended_alpha']:g} | {r['highest_mean_alpha']:g} | "
                     f"{r['alpha0_reward']:.3f} | {gain} | {'yes' if r['significant_gain'] else 'no'} | "
                     f"{'yes' if r['large_alpha_degrades'] else 'no'} |")
    return lines


def plot_seeds(runs: dict) -> bytes:
    """Left: reward against alpha, one line per seed and model; right: the recommended alpha's
    paired gain over alpha 0 with its interval, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.report import figure_png

    fig, (ax_c, ax_g) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    colors = {"dpo_small": "tab:blue", "dpo_large": "tab:orange"}
    seeds = list(runs)
    for i, (seed, summary) in enumerate(runs.items()):
        for j, (name, d) in enumerate(summary["dpo"].items()):
            points = [r for r in d["results"] if r["alpha"] is not None]
            ax_c.plot([r["alpha"] for r in points], [r["mean_reward"] for r in points], marker="o", markersize=3,
                      color=colors.get(name), alpha=0.8, linestyle=("-", "--", ":", "-.")[i % 4],
                      label=f"{name}, seed {seed}")
            f = d["finding"]
            x = i + (j - 0.5) * 0.25
            if f["gain"] is not None:
                ax_g.errorbar([x], [f["gain"]], yerr=[[f["gain"] - f["gain_low"]], [f["gain_high"] - f["gain"]]],
                              marker="o", capsize=3, color=colors.get(name), label=name if i == 0 else None)
                ax_g.annotate(f"alpha {f['best_alpha']:g}", (x, f["gain_high"]), ha="center", va="bottom", fontsize=7)
    _alpha_axis(ax_c)
    ax_c.set_ylabel("mean reward")
    ax_c.legend(fontsize=6)
    ax_g.axhline(0, color="gray", linewidth=0.8)
    ax_g.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax_g.set_ylabel("gain of the recommended alpha over alpha 0\n(paired, family-wise 95% CI)")
    ax_g.legend(fontsize=8)
    fig.suptitle("expo-ray demo across seeds", fontsize=10)
    return figure_png(fig)
