"""Each options object is the one home of its defaults: the command line, sweep specs and Ray hops
all read them from there."""
import dataclasses

import click
import pytest

from expo_ray.cli import main
from expo_ray.options import EngineOptions, PlanOptions, PromptOptions, SamplingOptions, SearchOptions, WriteOptions
from expo_ray.sweep.spec import SpecError, parse_spec

COMMANDS = {  # command -> the options objects whose flags it has
    "extrapolate": (PlanOptions, WriteOptions),
    "run": (PlanOptions, WriteOptions, PromptOptions, EngineOptions, SamplingOptions),
    "evaluate": (PromptOptions, EngineOptions, SamplingOptions),
    "search": (SearchOptions, PlanOptions, PromptOptions, EngineOptions, SamplingOptions),
}
SEARCH_SKIPS = {"swap", "max_engines"}  # one swapping engine: not a choice there


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_line_defaults_are_the_objects_defaults(command):
    params = {p.name: p for p in main.commands[command].params}
    for cls in COMMANDS[command]:
        for f in cls.flags():
            if command == "search" and f.name in SEARCH_SKIPS:
                assert f.name not in params
                continue
            param = params[f.name]
            if f.default is dataclasses.MISSING:
                assert param.required, (command, f.name)
                continue
            # What the command gives the object when the flag is absent is the field's default.
            got = param.process_value(click.Context(main.commands[command]), param.get_default(click.Context(main)))
            got = tuple(got) if isinstance(got, list) else got
            assert got == f.default, (command, f.name, got, f.default)


def test_an_absent_flag_builds_the_default_object():
    ctx = main.commands["evaluate"].make_context("evaluate", ["--variants", "v", "--prompts", "p",
                                                              "--reward-model", "r"])
    params = dict(ctx.params)
    assert EngineOptions.from_params(params) == EngineOptions()
    assert SamplingOptions.from_params(params) == SamplingOptions()
    assert PromptOptions.from_params(params) == PromptOptions("p")


GOOD_SPEC = """
destination: /tmp/out
pairs:
  - {sft: /m/sft, aligned: /m/aligned}
evaluation:
  prompts: [alpaca_eval]
  reward_model: /m/rm
"""


def test_a_spec_without_options_gives_the_default_objects():
    spec = parse_spec(GOOD_SPEC, "s.yaml")
    assert spec.write == WriteOptions() and spec.pairs[0].plan == PlanOptions()
    assert spec.evaluation.engine == EngineOptions() and spec.evaluation.sampling == SamplingOptions()


def test_every_spec_key_reaches_its_option():
    spec = parse_spec(GOOD_SPEC.replace("{sft: /m/sft, aligned: /m/aligned}",
                                        "{sft: /m/sft, aligned: /m/aligned, allow_nonfinite: true, "
                                        "copy_unmatched: true}")
                      + "  model_cache: /nvme/cache\n  model_cache_gb: 12.5\n  fail_on_long_prompts: true\n"
                        "  sampling: {temperature: 0, top_k: 0, seed: 7, max_tokens: 9}\n"
                      + "chunk_mib: 64\nsha256: true\n", "s.yaml")
    assert spec.write == WriteOptions(chunk_mib=64, sha256=True)
    assert spec.pairs[0].plan == PlanOptions(allow_nonfinite=True, copy_unmatched=True)
    assert spec.evaluation.engine == EngineOptions(model_cache="/nvme/cache", model_cache_gb=12.5,
                                                   fail_on_long_prompts=True)
    assert spec.evaluation.sampling == SamplingOptions(temperature=0, top_k=0, seed=7, max_tokens=9)


def test_spec_values_are_checked_like_flags():
    with pytest.raises(SpecError) as e:
        parse_spec(GOOD_SPEC + "  model_cache_gb: 0\n  sampling: {top_p: 0, max_tokens: 0}\nchunk_mib: 70000\n",
                   "s.yaml")
    for message in ("evaluation.model_cache_gb: must be a number above 0", "evaluation.sampling.max_tokens: must be "
                    "an integer >= 1", "spec.chunk_mib: must be a number above 0, at most 65536"):
        assert message in str(e.value)
    with pytest.raises(SpecError, match="top_p must be in"):
        parse_spec(GOOD_SPEC + "  sampling: {top_p: 0}\n", "s.yaml")


def test_pair_ids_do_not_change_when_a_new_option_is_off():
    # Folders of sweeps written before allow_nonfinite existed keep their names.
    import hashlib
    import json

    spec = parse_spec(GOOD_SPEC, "s.yaml")
    before = json.dumps(["/m/sft", "/m/aligned", [], None, [], False, False])  # the inputs ids were made from
    assert spec.pairs[0].pair_id == hashlib.sha256(before.encode()).hexdigest()[:12]
    with_option = parse_spec(GOOD_SPEC.replace("aligned: /m/aligned}", "aligned: /m/aligned, allow_nonfinite: true}"),
                             "s.yaml")
    assert with_option.pairs[0].pair_id != spec.pairs[0].pair_id


@pytest.mark.parametrize("options", [
    PlanOptions(scales=("*.mlp.*=0.5",), exclude=("lm_head.weight",), allow_added_rows=True),
    EngineOptions(tp=2, use_gpu=False, chat_template="{{ x }}"),
    SamplingOptions.greedy(12),
    SearchOptions(grid=(0.0, 0.5), budget=10),
])
def test_plain_dicts_travel_and_come_back(options):
    import json

    assert type(options).from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_an_unknown_option_is_named():
    with pytest.raises(TypeError, match="chunk_mb"):
        WriteOptions.from_dict({"chunk_mb": 4})
    import expo_ray.api

    with pytest.raises(TypeError, match="scale_rules"):
        expo_ray.api.make_plan("/nowhere/sft", "/nowhere/aligned", [0.5], scale_rules=["x"])


def test_values_an_object_refuses_together_are_a_usage_error(tmp_path):
    from click.testing import CliRunner

    pytest.importorskip("vllm")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    result = CliRunner().invoke(main, ["evaluate", "--variants", str(tmp_path / "v"), "--prompts", str(prompts),
                                       "--reward-model", str(tmp_path / "rm"), "--top-p", "0"])
    assert result.exit_code == 2 and "top_p must be in (0, 1], got 0.0" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = CliRunner().invoke(main, ["evaluate", "--variants", str(tmp_path / "v"), "--prompts", str(prompts),
                                       "--reward-model", str(tmp_path / "rm"), "--no-swap", "--verify-swap"])
    assert result.exit_code == 2 and "--verify-swap checks weight swaps, and --no-swap turns them off" in result.output
    assert not (tmp_path / "v").exists()


def test_minus_zero_is_zero():
    import math

    from expo_ray.options import format_alpha, parse_alphas, variant_name

    for text in ("-0", "-0.0", "-0e5", "0"):
        (alpha,) = parse_alphas(text)
        assert alpha == 0.0 and math.copysign(1.0, alpha) == 1.0, text
    assert variant_name(-0.0) == "alpha_0.0" and format_alpha(-0.0) == "0.0"
