"""Generation for the variants of a LoRA-adapter pair: one multi-LoRA engine on the SFT model
generates the answers of every alpha in the same batches (alpha 0 is the aligned adapter itself;
the SFT model, when asked for, is the engine without a LoRA). Cached answers, reward scoring,
reports and AlpacaEval files are those of :mod:`.pipeline`, unchanged.

:func:`serving_problem` says before anything starts why the installed vLLM cannot serve an
adapter on the SFT model (then ``run`` writes merged variants instead, and ``evaluate`` refuses
in one line).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable

from ..checkpoint.identity import checkpoint_identity
from ..errors import ExpoError
from ..options import PlanOptions
from ..storage import open_storage
from .models import ModelRef

log = logging.getLogger("expo_ray")
MAX_JSON = 16 * 1024 * 1024


def adapter_group(models: list[ModelRef]) -> tuple[list[ModelRef], list[ModelRef]]:
    """(models one multi-LoRA engine serves, the others): the adapters, and their base model
    itself when it is evaluated too."""
    adapters = [m for m in models if m.base]
    if not adapters:
        return [], list(models)
    base = adapters[0].base
    if any(m.base != base for m in adapters):
        raise ExpoError("adapter variants of different SFT models cannot share one engine; evaluate one pair at a time")
    group = adapters + [m for m in models if not m.base and m.uri == base]
    return group, [m for m in models if m not in group]


def _json(uri: str, key: str) -> dict:
    store = open_storage(uri)
    return json.loads(store.read_bytes(key, limit=MAX_JSON))


def _base_layers_differ(sft_uri: str, adapter_uri: str) -> str | None:
    """vLLM skips the base layers PEFT saves beside an embedding or head LoRA: it serves the
    adapter right only when they are the SFT model's own tensors. The name of one that differs."""
    from ..checkpoint.folder import Checkpoint
    from ..lora.adapter import WEIGHTS_FILE, open_adapter

    adapter = open_adapter(adapter_uri)
    saved = [w for w in adapter.whole if w.why == "base layer"]
    if not saved:
        return None
    sft = Checkpoint.open(sft_uri)
    store = open_storage(adapter_uri)
    for w in saved:
        loc = sft.tensors.get(w.base)
        with store.open_reader(WEIGHTS_FILE) as a, sft.storage.open_reader(loc.shard) as s:
            if a.read(w.info.start, w.info.nbytes) != s.read(loc.info.start, loc.info.nbytes):
                return w.info.name
    return None


def serving_problem(sft_uri: str, adapter_uris: list[str]) -> str | None:
    """Why the installed vLLM cannot serve these adapters on the SFT model (one line), or None."""
    from .engine.multi_lora import adapter_problem

    config = _json(sft_uri, "config.json")
    problem = adapter_problem(config.get("architectures") or [], [_json(u, "adapter_config.json")
                                                                   for u in adapter_uris])
    if problem:
        return problem
    differs = _base_layers_differ(sft_uri, adapter_uris[0])
    if differs:
        return f"the adapter's {differs} differs from the SFT model's, and vLLM serves LoRAs on the SFT model's own"
    return None


def evaluable_plan(sft: str, aligned: str, alphas: tuple[float, ...], options: PlanOptions = PlanOptions()):
    """The plan of a pair that is then evaluated: for a LoRA adapter the installed vLLM can serve,
    adapter variants; else (or with ``merge``) merged variants with alpha 0 among them (the aligned
    model, evaluated by weight swaps like the others). With ``merge=False`` (adapters asked for
    explicitly) an adapter vLLM cannot serve is refused."""
    import dataclasses

    from ..lora.plan import ADAPTER, LoraPlan, make_plan

    plan = make_plan(sft, aligned, alphas, options)
    if not isinstance(plan, LoraPlan):
        return plan
    if plan.form == ADAPTER:
        problem = serving_problem(plan.sft_uri, [plan.adapter_uri])
        if problem is None:
            return plan
        if options.merge is False:
            raise ExpoError(f"{plan.adapter_uri}: {problem}; --adapter-variants asks for adapters (--merge writes "
                            "model folders)")
        log.warning("%s: %s; writing merged variants instead (--merge), evaluated by weight swaps",
                    plan.adapter_uri, problem)
        options = dataclasses.replace(options, merge=True)
    if 0.0 not in alphas:
        alphas = (0.0, *alphas)
    return make_plan(sft, aligned, alphas, options)


def generate_with_adapters(ray, engines, models: list[ModelRef], texts: list[str], sampling: dict,
                           save: Callable[[ModelRef, list[dict]], None]) -> None:
    """Every model of ``models`` (adapters on one base, and the base itself) in one engine and one batch."""
    from .engine.lora_actor import start_multi_lora
    from .engine.multi_lora import adapter_rank

    base = next(m.base for m in models if m.base)
    adapters = [m for m in models if m.base]
    aligned = next((m for m in adapters if m.alpha == 0.0), adapters[0])
    problem = serving_problem(base, [aligned.uri])
    if problem:
        raise ExpoError(f"{aligned.uri}: {problem}; write merged variants instead (expo-ray extrapolate --merge, "
                        "or run --merge) and evaluate those")
    configs = [_json(m.uri, "adapter_config.json") for m in adapters]
    remote = "://" in base and not base.startswith("file://")
    actor = start_multi_lora(
        engines, base, checkpoint_identity(base) if remote else None,
        {m.label: (m.uri, m.identity if "://" in m.uri else None) for m in adapters},
        max_rank=max(adapter_rank(c) for c in configs), slots=len(models), label=f"{base} with {len(adapters)} "
        "LoRA adapter(s)")
    jobs = {m.label: (m.label if m.base else None, list(texts)) for m in models}
    began = time.perf_counter()
    results = ray.get(actor.generate_many.remote(jobs, sampling))
    seconds = time.perf_counter() - began
    for m in models:
        save(m, results[m.label])
    info = engines.timings(actor)
    tokens = sum(g["tokens"] for gens in results.values() for g in gens)
    log.info("generated %d model(s) in one multi-LoRA batch: %d answers, %d tokens in %.0f s (%.0f tokens/s)%s",
             len(models), len(texts) * len(models), tokens, seconds, tokens / max(seconds, 1e-9),
             f"; its engine started in {info['startup_s']:.0f} s" if info.get("startup_s") is not None else "")
    engines.stop(actor)
