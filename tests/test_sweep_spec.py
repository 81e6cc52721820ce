"""Sweep specs: valid ones parse; bad ones fail before any work with the line and key named."""
import pytest

from expo_ray.sweep.spec import SpecError, parse_spec

GOOD = """\
destination: /tmp/sweep-out
alphas: [0.1, 0.3]
pairs:
  - name: first
    sft: /models/a-sft
    aligned: /models/a-dpo
  - sft: s3://bucket/b-sft
    aligned: hf://org/b-dpo@main
    alphas: [0.5, 1.0]
    rules: {scale: ["*.mlp.*=0.5"], layer_scales: "1,1,2", exclude: ["lm_head.weight"]}
evaluation:
  prompts: [{set: ultrafeedback, limit: 100}, /data/p.jsonl]
  reward_model: hf://weqweasdas/RM-Mistral-7B
  tp: 8
  sampling: {temperature: 0.7, max_tokens: 512}
"""


def test_good_spec():
    spec = parse_spec(GOOD, "s.yaml")
    assert [p.name for p in spec.pairs] == ["first", "b-dpo"]
    assert spec.pairs[0].alphas == (0.1, 0.3) and spec.pairs[1].alphas == (0.5, 1.0)
    assert spec.pairs[1].plan.scales == ("*.mlp.*=0.5",) and spec.pairs[1].plan.layer_scales == "1,1,2"
    assert (spec.evaluation.engine.tp == 8 and spec.evaluation.prompts[0].limit == 100
            and spec.evaluation.prompts[1].set == "/data/p.jsonl")
    # Ids are deterministic and depend on the inputs, not on the name.
    assert spec.pairs[0].pair_id == parse_spec(GOOD.replace("name: first", "name: renamed"), "s.yaml").pairs[0].pair_id


def test_search_mode_per_pair():
    spec = parse_spec(GOOD.replace("    aligned: /models/a-dpo",
                                   "    aligned: /models/a-dpo\n    mode: search\n    budget: 300", 1), "s.yaml")
    assert (spec.pairs[0].mode, spec.pairs[0].budget) == ("search", 300)
    assert (spec.pairs[1].mode, spec.pairs[1].budget) == ("grid", None)
    no_eval = GOOD.split("evaluation:")[0].replace("    aligned: /models/a-dpo",
                                                   "    aligned: /models/a-dpo\n    mode: search", 1)
    with pytest.raises(SpecError, match="search needs an evaluation section"):
        parse_spec(no_eval, "s.yaml")


@pytest.mark.parametrize("edit,message", [
    (("    aligned: /models/a-dpo", "    algined: /models/a-dpo"),
     "s.yaml line 6: pairs[0]: unknown key 'algined' (did you mean 'aligned'?)"),
    (("alphas: [0.1, 0.3]", "alphas: [-0.1, 0.3]"), "s.yaml line 2: spec.alphas: -0.1 is negative"),
    (("alphas: [0.1, 0.3]", "alphas: []"), "s.yaml line 2: spec.alphas: must be a non-empty list"),
    (("  - sft: s3://bucket/b-sft\n", "  - name: x\n"), "missing required key 'sft'"),
    (("destination: /tmp/sweep-out\n", ""), "spec: missing required key 'destination'"),
    (("  tp: 8", "  tp: 0"), "s.yaml line 14: evaluation.tp: must be an integer >= 1"),
    (("  sampling: {temperature: 0.7, max_tokens: 512}", "  sampling: {temprature: 0.7}"),
     "unknown key 'temprature' (did you mean 'temperature'?)"),
    (("  - name: first", "  - name: b-dpo"), "'b-dpo' is used by another pair"),
    (("pairs:", "pairs: [\n"), "not valid YAML"),
    (("    aligned: /models/a-dpo", "    aligned: /models/a-dpo\n    mode: bisect"),
     "s.yaml line 7: pairs[0].mode: 'bisect': use one of grid, search"),
    (("    aligned: /models/a-dpo", "    aligned: /models/a-dpo\n    budget: 100"),
     "pairs[0].budget: only applies with mode: search"),
])
def test_bad_specs_name_line_and_key(edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(SpecError) as exc:
        parse_spec(GOOD.replace(old, new, 1), "s.yaml")
    assert message in str(exc.value), str(exc.value)


def test_example_sweeps_in_jobs_parse():
    """The example specs shipped in jobs/sweeps are valid sweep specs."""
    from pathlib import Path

    from expo_ray.sweep.spec import load_spec

    specs = sorted((Path(__file__).parent.parent / "jobs" / "sweeps").glob("*.yaml"))
    assert [p.name for p in specs] == ["cpu-smoke.yaml", "tulu-2-70b.yaml", "zephyr-7b.yaml"]
    for p in specs:
        assert load_spec(str(p)).pairs
    assert load_spec(str(specs[1])).evaluation.engine.tp == 8


def test_engine_options_are_spec_keys_as_on_the_command_line():
    from expo_ray.options import EngineOptions

    engine = ("  device: cpu\n  max_engines: 2\n  swap: false\n  max_model_len: 4096\n  dtype: bfloat16\n"
              "  trust_remote_code: true\n")
    spec = parse_spec(GOOD + engine, "s.yaml")
    assert spec.evaluation.engine == EngineOptions(
        tp=8, reward_tp=1, use_gpu=False, max_engines=2, swap=False, max_model_len=4096, dtype="bfloat16",
        trust_remote_code=True)
    assert parse_spec(GOOD, "s.yaml").evaluation.engine == EngineOptions(tp=8)
    with pytest.raises(SpecError) as e:
        parse_spec(GOOD + "  device: tpu\n  dtype: int8\n  swap: maybe\n  max_engines: 0\n", "s.yaml")
    for message in ("evaluation.device: 'tpu': use gpu or cpu", "evaluation.dtype: 'int8'",
                    "evaluation.swap: must be true or false", "evaluation.max_engines: must be an integer >= 1"):
        assert message in str(e.value)


def test_a_pair_can_bring_its_own_chat_template(tmp_path):
    import json

    from expo_ray.demo.tiny import build_tokenizer
    from expo_ray.evaluation.engine.vllm_engine import EngineError, _load_tokenizer, _render

    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    spec = parse_spec(GOOD.replace("    aligned: /models/a-dpo", "    aligned: /models/a-dpo\n"
                                   f"    chat_template: {json.dumps(template)}", 1), "s.yaml")
    assert spec.pairs[0].chat_template == template and spec.pairs[1].chat_template is None
    # The override is what renders prompts for a tokenizer that has no template of its own.
    build_tokenizer(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(EngineError, match="has no chat template"):
        _load_tokenizer(str(tmp_path), False, "model")
    tok = _load_tokenizer(str(tmp_path), False, "model", template)
    assert tok.decode(_render(tok, [{"role": "user", "content": "hi"}], True)) == "<s>user: hi\n"
