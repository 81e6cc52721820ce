"""The evaluation report: report.json, report.md and a PNG of reward and length against alpha
(the shape of the ExPO paper's Figure 6)."""
from __future__ import annotations

import io
import json
import math
from datetime import datetime, timezone

from .._version import __version__
from .aggregate import AlphaStats, recommended_alpha, select
from .selection import describe


def report_json(stats: list[AlphaStats], context: dict) -> dict:
    chosen = select(stats)
    best = recommended_alpha(stats)
    aligned = next((s for s in stats if s.alpha == 0.0), None)
    return {
        "format": "expo-ray.report/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "expo_ray_version": __version__,
        **context,
        # "best" is the recommended alpha (the selection rule), not merely the highest mean
        "best": {"label": best.label, "alpha": best.alpha, "mean_reward": best.mean_reward,
                 "gain_vs_aligned": (best.mean_reward - aligned.mean_reward) if aligned else None,
                 "gain_ci_low": best.gain_ci_low, "gain_ci_high": best.gain_ci_high},
        "selection": {**chosen.summary(), "statement": describe(chosen)},
        "results": [s.as_dict() for s in stats],
    }


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def describe_swaps(swaps: dict) -> str:
    """One line on how the models were loaded: swapped into running engines (checked or proven), or not."""
    if swaps.get("fell_back"):
        return f"stopped after {swaps['swaps']} swap(s): {swaps['fell_back']}; one engine per model from there"
    if not swaps.get("swaps"):
        return "none (one engine per model)"
    how = {"none": "architecture proven for swapping, not checked",
           "first": "first swap of each engine checked against a fresh load",
           "every": "every swap checked against a fresh load (--verify-swap)"}.get(swaps.get("check"), "")
    return f"{swaps['swaps']} ({how}; {swaps['checked']} checked, all equal)"


def report_markdown(report: dict) -> str:
    lines = [f"# ExPO alpha search: {report.get('title', '')}".rstrip(": "), ""]
    for key in ("aligned", "sft", "prompts", "reward_model"):
        if report.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{report[key]}`")
    if report.get("sampling"):
        lines.append("- sampling: " + ", ".join(f"{k}={v}" for k, v in report["sampling"].items()))
    if report.get("weight_swaps"):
        lines.append(f"- weight swaps: {describe_swaps(report['weight_swaps'])}")
    best, sel = report["best"], report["selection"]
    lines += ["", f"**Recommended alpha: {_fmt(best['alpha'])}** (mean reward {_fmt(best['mean_reward'])}"
              + (f", {best['gain_vs_aligned']:+.3f} vs the aligned "
                 "model)" if best["gain_vs_aligned"] is not None else ")"),
              "", f"Selection: {sel['statement']}.", "",
              "| model | alpha | n | mean reward | 95% CI | gain vs alpha=0 (paired, "
              f"{100 * sel['interval_level']:.2f}% CI) "
              "| tied with best | mean tokens | truncated | win rate vs alpha=0 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        gain = "-" if r.get("gain_vs_aligned") is None else \
            f"{r['gain_vs_aligned']:+.3f} [{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}]"
        tied = {None: "-", True: "yes", False: "no"}[r.get("tied_with_best")]
        lines.append(f"| {r['label']} | {_fmt(r['alpha'])}{' **rec.**' if r.get('recommended') else ''} | {r['n']} | "
                     f"{_fmt(r['mean_reward'])} | [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {gain} | {tied} | "
                     f"{_fmt(r['mean_tokens'])} | {_fmt(r['truncated_share'])} | {_fmt(r['win_rate_vs_aligned'])} |")
    if report.get("plot"):
        lines += ["", f"![reward and length against alpha]({report['plot']})"]
    return "\n".join(lines) + "\n"


def plot_png(stats: list[AlphaStats], title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in stats if s.alpha is not None]
    xs = [s.alpha for s in points]
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    ax_r.errorbar(xs, [s.mean_reward for s in points],
                  yerr=[[s.mean_reward - s.ci_low for s in points], [s.ci_high - s.mean_reward for s in points]],
                  marker="o", capsize=3)
    rec = next((s for s in points if s.recommended), None)
    if rec is not None:
        ax_r.plot([rec.alpha], [rec.mean_reward], marker="*", markersize=14, color="tab:red", linestyle="none",
                  label=f"recommended (alpha {rec.alpha:g})")
    sft = next((s for s in stats if s.alpha is None), None)
    if sft is not None:
        ax_r.axhline(sft.mean_reward, color="gray", linestyle="--", label="SFT")
    if rec is not None or sft is not None:
        ax_r.legend(fontsize=8)
    ax_r.set_xlabel("alpha")
    ax_r.set_ylabel("mean reward (95% CI)")
    ax_l.plot(xs, [s.mean_tokens for s in points], marker="s", color="tab:orange")
    ax_l.set_xlabel("alpha")
    ax_l.set_ylabel("mean response length (tokens)")
    if title:
        fig.suptitle(title)
    return figure_png(fig)


def write_report(storage, stats: list[AlphaStats], context: dict, prefix: str = "") -> dict:
    """Write report.png, report.json and report.md under `prefix` of `storage`; returns the report."""
    def key(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    storage.write_bytes(key("report.png"), plot_png(stats, context.get("title", "")))
    report = report_json(stats, dict(context, plot="report.png"))
    storage.write_bytes(key("report.json"), (json.dumps(report, indent=2) + "\n").encode())
    storage.write_bytes(key("report.md"), report_markdown(report).encode())
    return report


def figure_png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
