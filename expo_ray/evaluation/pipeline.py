"""Evaluation on Ray: generate with every model, score with the reward model, aggregate, report.

    models (committed variants + alpha 0 [+ SFT])
      -> generation actors (vLLM engines; each loads model after model in place)
      -> reward actor (a sequence-classification reward model in vLLM)
      -> per-alpha statistics -> report.json / report.md / report.png

Results are cached in the output folder, keyed by (model identity, prompt set, sampling) for
generations and additionally by the reward model for rewards: a re-run reuses what exists and
fills in only what is missing.
"""
from __future__ import annotations

import json
import logging
import time

from ..checkpoint.identity import checkpoint_identity, evaluation_id, generation_key, reward_key
from ..cluster.ray_runtime import ensure_ray
from ..errors import ExpoError
from ..options import EngineOptions, SamplingOptions, format_alpha
from ..storage import Storage, open_storage
from .adapter_generation import adapter_group, generate_with_adapters
from .aggregate import Scored, summarize
from .engine.actors import Engines, plan_for
from .engine.vllm_engine import SwapNotFaithful
from .engine.vllm_support import installed_version, resolve_swap
from .engine.weight_swap import WeightsMismatch
from .models import ModelRef, model_config, models_to_evaluate
from .prompts import PromptSet
from .report import write_report

log = logging.getLogger("expo_ray")


def _generate_all(ray, engines: Engines, todo: list[ModelRef], texts, sampling, swap: bool, save) -> dict:
    """Up to max_engines engines; each result is saved as it arrives. Returns what was swapped
    and checked (for the report).

    With ``swap`` an engine that finished one model loads the next model's weights in
    place (no restart) when its tensors fit; a model that does not fit gets an engine of its own.
    A swap the engine finds unfaithful (architectures not proven for swapping are checked on
    their first swap) ends swapping: that model and the rest get engines of their own, or, with
    ``--swap`` asked for, the evaluation stops. Without it every model gets a new engine. By
    default as many engines run as the cluster holds can grow to with swapping, one per model
    without (Ray queues what does not fit).
    """
    n_engines = engines.placement.engines if swap else max(1, min(len(todo), engines.engine.max_engines or len(todo)))
    queue, running = list(todo), {}
    record = _swap_record(swap)

    def start(m: ModelRef):
        return engines.generation(m.uri, m.identity, swappable=record["used"], label=m.label)

    def submit(m: ModelRef, actor, swap: bool) -> None:
        served = actor.serve.remote(m.uri, m.identity) if swap else None
        ref = actor.generate.remote(texts, sampling)
        running[ref] = (m, actor, served)

    try:
        while queue and len(running) < n_engines:
            m = queue.pop(0)
            submit(m, start(m), False)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            m, actor, served = running.pop(done[0])
            if served is not None:
                try:
                    info = ray.get(served)
                    _note_swap(record, m, info)
                except SwapNotFaithful as exc:
                    why = str(getattr(exc, "cause", exc))
                    if engines.engine.swap:
                        raise ExpoError(f"{why}: --swap was asked for; use --no-swap (one engine per model)") from None
                    log.warning("%s; one engine per model from here on (as with --no-swap)", why)
                    record.update(used=False, fell_back=why)
                    engines.stop(actor)
                    submit(m, start(m), False)
                    continue
                except WeightsMismatch as exc:  # this model needs its own engine
                    log.info("%s does not fit the running engine (%s); starting an engine for it",
                             m.label, str(exc).splitlines()[-1] if str(exc) else exc)
                    engines.stop(actor)
                    submit(m, start(m), False)
                    continue
            generations = ray.get(done[0])
            save(m, generations)
            info = engines.timings(actor)
            tokens, seconds = sum(g["tokens"] for g in generations), info.get("last_call_s") or float("nan")
            started = f"; its engine started in {info['startup_s']:.0f} s" if served is None and info else ""
            log.info("generated %s: %d answers, %d tokens in %.0f s (%.0f tokens/s)%s; %d of %d models done",
                     m.label, len(texts), tokens, seconds, tokens / max(seconds, 1e-9), started,
                     len(todo) - len(queue) - len(running), len(todo))
            if queue and record["used"]:
                submit(queue.pop(0), actor, True)
            else:
                engines.stop(actor)
                if queue:
                    m = queue.pop(0)
                    submit(m, start(m), False)
    finally:
        for _, actor, _ in running.values():
            ray.kill(actor)
    return record


def _swap_record(used: bool) -> dict:
    """What the report says of weight swaps, before any."""
    return {"used": used, "swaps": 0, "checked": 0, "check": None, "architecture": None, "fell_back": None}


def _note_swap(record: dict, m: ModelRef, info: dict) -> None:
    check = info.get("check")
    checked = (f"; checked against a fresh load in {check['seconds']:.2f} s ({check['layers']} layer outputs, "
               f"{check['params']} parameters equal)" if check else "")
    log.info("%s: weights swapped into the running engine in %.2f s%s", m.label, info["seconds"], checked)
    record["swaps"] += 1
    record["checked"] += 1 if check else 0
    swap = info.get("swap") or {}
    record["check"] = swap.get("check", record["check"])
    record["architecture"] = swap.get("architecture")


def fitting_prompts(models: list[ModelRef], prompts: PromptSet, engine: EngineOptions) -> tuple[PromptSet, dict]:
    """The prompts every model's context holds, and a record of those skipped (or ExpoError)."""
    import dataclasses

    from .prompt_fit import prompts_too_long

    texts = [p.text for p in prompts.prompts]
    long: dict[int, int] = {}
    for m in models:
        if m.alpha is None or m.alpha == 0.0:  # variants share the aligned model's tokenizer
            long.update(prompts_too_long(m.base or m.uri, texts, max_model_len=engine.max_model_len,
                                         trust_remote_code=engine.trust_remote_code,
                                         chat_template=engine.chat_template))
    if not long:
        return prompts, {"count": 0, "ids": []}
    ids = [prompts.prompts[i].id for i in sorted(long)]
    first = min(long)
    what = (f"{len(long)} of {len(texts)} prompt(s) of {prompts.source} do not fit the model's context "
            f"(first: {prompts.prompts[first].id}, {long[first]} tokens"
            + (f", --max-model-len {engine.max_model_len})" if engine.max_model_len else ")"))
    if engine.fail_on_long_prompts:
        raise ExpoError(f"{what}; raise --max-model-len, shorten them, or drop --fail-on-long-prompts")
    if len(long) == len(texts):
        raise ExpoError(f"{what}: nothing left to evaluate")
    log.warning("%s: skipped (listed in the report)", what)
    kept = tuple(p for i, p in enumerate(prompts.prompts) if i not in long)
    return dataclasses.replace(prompts, prompts=kept), {"count": len(long), "ids": ids}


def _read_json(store: Storage, key: str):
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def evaluate_variants(variants_uri: str, prompts: PromptSet, reward_model: str, *,
                      sampling: SamplingOptions = SamplingOptions(), engine: EngineOptions = EngineOptions(),
                      out_uri: str | None = None, include_sft: bool = False, address: str | None = None,
                      title: str = "") -> dict:
    """Evaluate every committed variant under `variants_uri`; returns the report (also written)."""
    from .engine.vllm_engine import check_reward_model

    began = time.perf_counter()
    engine.export_cache_settings()
    sampling = sampling.to_dict()
    models = models_to_evaluate(variants_uri, include_sft)
    check_reward_model(reward_model, engine.trust_remote_code, model_config(reward_model))  # before any engine starts
    prompts, skipped = fitting_prompts(models, prompts, engine)
    reward_id = checkpoint_identity(reward_model)
    eval_id = evaluation_id(prompts.fingerprint, sampling, reward_id)
    out = open_storage(out_uri or f"{variants_uri.rstrip('/')}/eval/{prompts.name}-{eval_id}")

    texts = [p.text for p in prompts.prompts]
    gen_keys = {m.label: generation_key(m.identity, prompts.fingerprint, sampling, engine.max_model_len,
                                        engine.chat_template)
                for m in models}
    todo = [m for m in models if not out.exists(f"cache/generations-{gen_keys[m.label]}.json")]
    log.info("evaluating %d model(s) on %d prompts (%s); %d need generation, the rest are cached",
             len(models), len(texts), prompts.name, len(todo))

    reward_keys = {m.label: reward_key(gen_keys[m.label], reward_id) for m in models}
    to_score = [m for m in models if not out.exists(f"cache/rewards-{reward_keys[m.label]}.json")]
    ray = ensure_ray(address)
    plan = plan_for(ray, engine, len(todo))
    swap = resolve_swap(engine.swap, installed_version()) if todo else False
    swaps = _swap_record(False)
    engines = Engines(ray, engine, plan, f"{out.uri.rstrip('/')}/logs")
    try:
        if todo:
            def save(m: ModelRef, gens: list[dict]) -> None:
                out.write_bytes(f"cache/generations-{gen_keys[m.label]}.json", json.dumps(gens).encode())

            lora, full = adapter_group(todo)  # LoRA variants: every alpha in one multi-LoRA engine
            if lora:
                generate_with_adapters(ray, engines, lora, texts, sampling, save)
            if full:
                swaps = _generate_all(ray, engines, full, texts, sampling, swap, save)
        if to_score:
            scorer = engines.reward(reward_model)
            for i, m in enumerate(to_score, 1):
                generations = _read_json(out, f"cache/generations-{gen_keys[m.label]}.json")
                rewards = ray.get(scorer.score.remote(texts, [g["output"] for g in generations]))
                out.write_bytes(f"cache/rewards-{reward_keys[m.label]}.json", json.dumps(rewards).encode())
                info = engines.timings(scorer)
                started = f"; its engine started in {info['startup_s']:.0f} s" if i == 1 and info else ""
                log.info("scored %s: %d answers in %.0f s%s; %d of %d models done", m.label, len(texts),
                         info.get("last_call_s") or float("nan"), started, i, len(to_score))
    finally:
        engines.close()

    results, alphas = {}, {}
    aligned_uri = _aligned_uri(models)
    for m in models:
        generations = _read_json(out, f"cache/generations-{gen_keys[m.label]}.json")
        rewards = _read_json(out, f"cache/rewards-{reward_keys[m.label]}.json")
        if generations is None or rewards is None or not len(rewards) == len(generations) == len(texts):
            raise ExpoError(f"{out.describe()}: results for {m.label} are incomplete")
        _write_responses(out, m, prompts, generations, rewards, generator_name(m, aligned_uri))
        results[m.label] = [Scored(p.id, r, g["tokens"], g["finish_reason"])
                            for p, g, r in zip(prompts.prompts, generations, rewards)]
        alphas[m.label] = m.alpha
    stats = summarize(results, alphas)
    context = {"title": title or variants_uri, "variants": variants_uri, "prompts": prompts.source,
               "prompt_set": prompts.name, "n_prompts": len(texts), "reward_model": reward_model,
               "sampling": sampling, "tensor_parallel_size": engine.tp,
               "engines": {"device": "GPU" if plan.generation.use_gpu else "CPU", "generation": plan.engines},
               "skipped_prompts": skipped, "weight_swaps": swaps,
               "models": {m.label: m.uri for m in models}, "seconds": round(time.perf_counter() - began, 1)}
    report = write_report(out, stats, context)
    report["location"] = out.uri
    report["generated"] = [m.label for m in todo]
    report["scored"] = [m.label for m in to_score]
    report["work_done"] = bool(todo or to_score)
    log.info("report: %s/report.md", out.uri)
    return report


def _aligned_uri(models: list[ModelRef]) -> str:
    """Where the aligned model came from: a variant's manifest says; else the alpha-0 model is it."""
    from ..publish.manifest import read_manifest

    for m in models:
        if m.alpha:
            manifest = read_manifest(open_storage(m.uri))
            if manifest:
                return manifest["sources"]["aligned"]
    return next((m.uri for m in models if m.alpha == 0.0), "")


def model_name(uri: str) -> str:
    """The last part of a model's location, without a revision: hf://org/zephyr-7b-beta@abc -> zephyr-7b-beta."""
    return uri.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]


def generator_name(m: ModelRef, aligned_uri: str) -> str:
    """AlpacaEval's `generator`: the aligned model's name, with -expo-alpha<alpha> for a variant
    (alpha 0 is the aligned model itself); the SFT model's own name."""
    if m.alpha is None:
        return model_name(m.uri)
    name = model_name(aligned_uri)
    return name if m.alpha == 0.0 else f"{name}-expo-alpha{format_alpha(m.alpha)}"


def _write_responses(out: Storage, m: ModelRef, prompts: PromptSet, generations: list[dict], rewards: list[float],
                     generator: str):
    """responses/LABEL.jsonl and the AlpacaEval-format responses/LABEL.alpaca_eval.json."""
    lines = [json.dumps({"prompt_id": p.id, "prompt": p.text, "output": g["output"], "tokens": g["tokens"],
                         "finish_reason": g["finish_reason"], "reward": r})
             for p, g, r in zip(prompts.prompts, generations, rewards)]
    out.write_bytes(f"responses/{m.label}.jsonl", ("\n".join(lines) + "\n").encode())
    alpaca = [{"instruction": p.text, "output": g["output"], "generator": generator,
               "dataset": p.dataset or prompts.name} for p, g in zip(prompts.prompts, generations)]
    out.write_bytes(f"responses/{m.label}.alpaca_eval.json", json.dumps(alpaca, indent=1).encode())
