"""The Python API (for notebooks and scripts): the same steps as the `expo-ray` command.

Options are given as keyword arguments, by the names of the fields of the options objects in
:mod:`expo_ray.options` (PlanOptions, WriteOptions, EngineOptions, SamplingOptions, SearchOptions).
"""
from __future__ import annotations

from typing import Sequence

from .extrapolation.plan import Plan
from .lora.plan import make_plan as _make_plan
from .options import EngineOptions, PlanOptions, SamplingOptions, SearchOptions, WriteOptions
from .publish.run import ExtrapolationResult, run_plan


def _split(options: dict, *classes) -> list:
    """One object per class from keyword arguments; an unknown name is a TypeError."""
    fields = [{f for f in cls.__dataclass_fields__} for cls in classes]
    unknown = set(options) - set().union(*fields)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return [cls.from_dict({k: v for k, v in options.items() if k in names}) for cls, names in zip(classes, fields)]


def make_plan(sft: str, aligned: str, alphas: Sequence[float], **plan_options) -> Plan:
    """Open both checkpoints (headers only), pair tensors by name and validate (PlanOptions fields)."""
    (plan,) = _split(plan_options, PlanOptions)
    return _make_plan(sft, aligned, alphas, plan)


def extrapolate(sft: str, aligned: str, alphas: Sequence[float], out: str, *, address: str | None = None,
                show_progress: bool = True, **options) -> ExtrapolationResult:
    """Write one committed variant folder per alpha under `out` (PlanOptions and WriteOptions fields,
    e.g. scales=["*.mlp.*=0.5"], chunk_mib=512, sha256=True)."""
    plan, write = _split(options, PlanOptions, WriteOptions)
    return run_plan(_make_plan(sft, aligned, alphas, plan), out, write=write, address=address,
                    show_progress=show_progress)


def evaluate(variants: str, prompts, reward_model: str, *, out: str | None = None, sampling: dict | None = None,
             include_sft: bool = False, address: str | None = None, **engine) -> dict:
    """Generate answers with every committed variant under `variants` (and alpha 0, the aligned
    model), score them with `reward_model`, write responses and the report; return the report.

    `prompts`: a PromptSet (:func:`load_prompts`) or what load_prompts takes ("ultrafeedback",
    "alpaca_eval", a file). `sampling`: SamplingOptions fields (default: the ExPO paper's).
    `engine`: EngineOptions fields (tp, reward_tp, max_model_len, dtype, trust_remote_code, ...).
    """
    from .evaluation.pipeline import evaluate_variants
    from .evaluation.prompts import load_prompts

    prompts = load_prompts(prompts) if isinstance(prompts, str) else prompts
    return evaluate_variants(variants, prompts, reward_model, sampling=SamplingOptions.from_dict(sampling),
                             engine=EngineOptions.from_dict(engine), out_uri=out, include_sft=include_sft,
                             address=address)


def search(sft: str, aligned: str, prompts, reward_model: str, *, out: str, alphas: Sequence[float] | None = None,
           budget: int | None = None, initial_prompts: int | None = None, sampling: dict | None = None,
           materialize: bool = True, plan_options: dict | None = None, address: str | None = None,
           **engine) -> dict:
    """Adaptive alpha search on one engine that swaps weights in place (report under `out`/search);
    with `materialize`, the best alpha is then written and verified under `out`. Returns the
    report, with "materialized": the variant URIs written. `plan_options`: PlanOptions fields."""
    from .alpha_search.driver import materialize as write_variants, search_alpha
    from .evaluation.prompts import load_prompts

    prompts = load_prompts(prompts) if isinstance(prompts, str) else prompts
    settings = SearchOptions(budget=budget, initial_prompts=initial_prompts,
                             **({"grid": tuple(float(a) for a in alphas)} if alphas is not None else {}))
    plan = PlanOptions.from_dict(plan_options)
    report = search_alpha(sft, aligned, prompts, reward_model, out_uri=out, address=address,
                          sampling=SamplingOptions.from_dict(sampling), engine=EngineOptions.from_dict(engine),
                          search=settings, plan=plan)
    report["materialized"] = (write_variants(sft, aligned, [report["best"]["alpha"]], out, plan=plan,
                                             address=address, show_progress=False) if materialize else [])
    return report
