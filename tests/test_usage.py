"""How the package is used: `python -m expo_ray`, flags anywhere, help for every option, each
command with only the options it uses, quiet output off a terminal, AlpacaEval generator names,
and the top-level Python API."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest

import expo_ray
from expo_ray.cli import main
from expo_ray.evaluation.models import ModelRef
from expo_ray.evaluation.pipeline import generator_name


def _commands():
    return [("expo-ray", main)] + [(f"expo-ray {name}", cmd) for name, cmd in main.commands.items()]


@pytest.mark.parametrize("where,command", _commands(), ids=[w for w, _ in _commands()])
def test_every_option_has_help(where, command):
    missing = [p.opts for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not missing, f"{where}: options without help: {missing}"


def test_search_takes_only_the_options_it_uses():
    search = {p.name for p in main.commands["search"].params}
    evaluate = {p.name for p in main.commands["evaluate"].params}
    assert {"swap", "include_sft", "eval_out"} <= evaluate
    assert not {"swap", "include_sft", "eval_out"} & search, search


@pytest.mark.parametrize("flag", ["-tp", "--tp", "--tensor-parallel-size"])
def test_tensor_parallel_aliases(flag):
    ctx = main.commands["evaluate"].make_context(
        "evaluate", ["--variants", "v", "--prompts", "p", "--reward-model", "r", flag, "4"])
    assert ctx.params["tp"] == 4


def test_python_m_with_quiet_after_the_subcommand_and_no_bar_off_a_terminal(bf16_pair, tmp_path):
    env = dict(os.environ, RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "variants"
    run = subprocess.run([sys.executable, "-m", "expo_ray", "extrapolate", "--sft", str(bf16_pair[0]),
                          "--aligned", str(bf16_pair[1]), "--alpha", "0.5", "--out", str(out), "-q"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{out}/alpha_0.5: written" in run.stdout
    assert " INFO " not in run.stderr and "\r" not in run.stderr, run.stderr  # -q, and no bar in a pipe
    help_run = subprocess.run([sys.executable, "-m", "expo_ray", "verify", "--help", "-v"], capture_output=True,
                              text=True, timeout=120)
    assert help_run.returncode == 0 and help_run.stdout.startswith("Usage: expo-ray verify"), help_run.stdout


@pytest.mark.parametrize("label,alpha,uri,expected", [
    ("alpha_0.3", 0.3, "s3://b/zephyr-expo/alpha_0.3", "zephyr-7b-beta-expo-alpha0.3"),
    ("alpha_0.0", 0.0, "hf://HuggingFaceH4/zephyr-7b-beta@892b3d7", "zephyr-7b-beta"),
    ("sft", None, "hf://HuggingFaceH4/mistral-7b-sft-beta@3d8b6d8", "mistral-7b-sft-beta"),
])
def test_alpaca_eval_generator_names(label, alpha, uri, expected):
    aligned = "hf://HuggingFaceH4/zephyr-7b-beta@892b3d7"
    assert generator_name(ModelRef(label, alpha, uri, "id"), aligned) == expected


def test_top_level_api(ray_local, bf16_pair, tmp_path):
    sft, aligned = (str(p) for p in bf16_pair)
    result = expo_ray.extrapolate(sft, aligned, [0.5], str(tmp_path / "out"), show_progress=False)
    assert result.variants == {"alpha_0.5": "written"}
    assert json.loads((tmp_path / "out" / "alpha_0.5" / "manifest.json").read_text())["alpha"] == 0.5
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"instruction": f"Say {w}."}) for w in ("yes", "no", "maybe")))
    prompts = expo_ray.load_prompts(str(prompts_file), limit=2)
    assert [p.text for p in prompts.prompts] == ["Say yes.", "Say no."]
    # search checks its settings before any engine starts: a budget below one grid pass is refused.
    with pytest.raises(ValueError, match="budget of 1 generations"):
        expo_ray.search(sft, aligned, prompts, aligned, out=str(tmp_path / "s"), alphas=[0, 0.5], budget=1)
    import inspect

    for name in ("extrapolate", "evaluate", "search", "load_prompts"):  # plain functions, not modules
        assert inspect.isfunction(getattr(expo_ray, name)), name
    assert not (tmp_path / "s").exists()
