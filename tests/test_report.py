"""Aggregation, alpha choice, report files; prompt sets and their bad inputs (no vLLM needed)."""
import json

import numpy as np
import pytest
from helpers import hf_cache_entry

from expo_ray.errors import ExpoError
from expo_ray.evaluation.aggregate import Scored, bootstrap_ci, recommended_alpha, summarize, win_rate
from expo_ray.evaluation.prompts import load_prompts
from expo_ray.evaluation.report import write_report
from expo_ray.storage import LocalStorage


def scored(rewards, tokens=10, finish="stop"):
    return [Scored(str(i), r, tokens, finish) for i, r in enumerate(rewards)]


def test_summary_win_rate_and_recommended_alpha_ties_to_smaller():
    results = {
        "alpha_0.0": scored([0.0, 1.0, 2.0, 3.0]),
        "alpha_0.3": scored([1.0, 1.0, 3.0, 4.0], tokens=12),
        "alpha_0.5": scored([1.0, 1.0, 3.0, 4.0], tokens=20, finish="length"),
        "sft": scored([-1.0, 0.0, 0.0, 0.0]),
    }
    alphas = {"alpha_0.0": 0.0, "alpha_0.3": 0.3, "alpha_0.5": 0.5, "sft": None}
    stats = summarize(results, alphas)
    assert [s.label for s in stats] == ["sft", "alpha_0.0", "alpha_0.3", "alpha_0.5"]
    by = {s.label: s for s in stats}
    assert by["alpha_0.3"].mean_reward == 2.25 and by["alpha_0.3"].win_rate_vs_aligned == (1 + 0.5 + 1 + 1) / 4
    assert by["alpha_0.5"].truncated_share == 1.0 and by["alpha_0.0"].win_rate_vs_aligned == 0.5
    assert recommended_alpha(stats).label == "alpha_0.3"  # tie with 0.5: the smaller alpha
    assert by["alpha_0.5"].tied_with_best and by["alpha_0.3"].gain_vs_aligned == 0.75
    assert by["alpha_0.3"].ci_low <= 2.25 <= by["alpha_0.3"].ci_high


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=50), rng.normal(size=5000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    assert win_rate({"a": 1.0}, {"b": 0.0}) is None


def test_report_files(tmp_path):
    results = {"alpha_0.0": scored([0.0, 1.0]), "alpha_0.4": scored([1.0, 2.0], tokens=15)}
    stats = summarize(results, {"alpha_0.0": 0.0, "alpha_0.4": 0.4})
    report = write_report(LocalStorage(tmp_path), stats, {"title": "tiny", "prompts": "p.jsonl"})
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["best"]["alpha"] == 0.4
    assert report["best"]["gain_vs_aligned"] == 1.0
    md = (tmp_path / "report.md").read_text()
    assert "**Recommended alpha: 0.400**" in md and "| alpha_0.4 | 0.400 **rec.** | 2 |" in md
    assert "significant gain over the aligned model" in md and report["selection"]["significant_gain"]


def test_report_says_when_nothing_beats_alpha_0(tmp_path):
    # A larger alpha with a (slightly) higher mean, within noise: the report recommends alpha 0.
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    results = {"alpha_0.0": scored(base), "alpha_2.0": scored(base + 0.01 + 0.5 * rng.normal(size=64))}
    stats = summarize(results, {"alpha_0.0": 0.0, "alpha_2.0": 2.0})
    assert stats[1].mean_reward > stats[0].mean_reward
    report = write_report(LocalStorage(tmp_path), stats, {"title": "tiny"})
    assert report["best"]["alpha"] == 0.0 and report["best"]["gain_vs_aligned"] == 0.0
    assert not report["selection"]["significant_gain"] and report["selection"]["best_mean"] == 2.0
    assert "Selection: alpha 0: no significant gain over the aligned model" in (tmp_path / "report.md").read_text()


def test_prompt_files_and_bad_input(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"})
                                                for i in range(10)))
    ps = load_prompts(str(tmp_path / "p.jsonl"))
    assert len(ps.prompts) == 10 and ps.prompts[3].id == "q3" and ps.prompts[3].text == "question 3"
    assert len(load_prompts(str(tmp_path / "p.jsonl"), limit=4).prompts) == 4
    sampled = load_prompts(str(tmp_path / "p.jsonl"), sample=5, seed=7)
    assert len(sampled.prompts) == 5 and sampled.prompts == load_prompts(str(tmp_path / "p.jsonl"),
                                                                         sample=5, seed=7).prompts
    (tmp_path / "chat.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "x"}]}]))
    assert load_prompts(str(tmp_path / "chat.json")).prompts[0].text == "hi"
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ExpoError, match="nofield.jsonl: no prompt field .*use --prompt-field"):
        load_prompts(str(tmp_path / "nofield.jsonl"))
    assert load_prompts(str(tmp_path / "nofield.jsonl"), field="text").prompts[0].text == "a"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ExpoError, match="empty.jsonl: the prompt set is empty"):
        load_prompts(str(tmp_path / "empty.jsonl"))




def test_known_prompt_sets_from_an_offline_hub_cache(tmp_path, monkeypatch):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": ["first?", "second?"], "prompt_id": ["a1", "b2"],
        "messages": [[{"role": "user", "content": "first?"}, {"role": "assistant", "content": "x"}],
                     [{"role": "user", "content": "second?"}, {"role": "assistant", "content": "y"}]],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    hf_cache_entry(tmp_path, "HuggingFaceH4/ultrafeedback_binarized", kind="datasets",
                   files={"data/test_gen-00000-of-00001.parquet": buf.getvalue()})
    hf_cache_entry(tmp_path, "tatsu-lab/alpaca_eval", kind="datasets", files={"alpaca_eval.json": json.dumps(
        [{"instruction": "Explain X.", "output": "", "generator": "gpt4", "dataset": "helpful_base"}]).encode()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    uf = load_prompts("ultrafeedback")
    assert [(p.id, p.text) for p in uf.prompts] == [("a1", "first?"), ("b2", "second?")]
    ae = load_prompts("alpaca_eval")
    assert ae.prompts[0].text == "Explain X." and ae.prompts[0].dataset == "helpful_base"


def test_a_sample_keeps_the_file_order_whatever_the_ids(tmp_path):
    ids = ["q-b", "q-a", "7", "q-c", "3", "q-d", "q-e", "1"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in ids))
    sampled = [p.id for p in load_prompts(str(path), sample=5, seed=3).prompts]
    assert len(sampled) == 5 and len(set(sampled)) == 5
    assert sampled == [i for i in ids if i in sampled]  # file order, not 0 for every non-numeric id
