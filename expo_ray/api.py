"""The library entry points the CLI and jobs call: open, plan, execute."""
from __future__ import annotations

from typing import Sequence

from .checkpoint import Checkpoint
from .extrapolate import DEFAULT_CHUNK_MIB, ExtrapolationResult, run_plan
from .plan import AlphaRules, Options, Plan, build_plan


def make_plan(sft: str, aligned: str, alphas: Sequence[float], *, scales: Sequence[str] = (),
              layer_scales: str | None = None, exclude: Sequence[str] = (), copy_unmatched: bool = False,
              allow_added_rows: bool = False, allow_nonfinite: bool = False) -> Plan:
    """Open both checkpoints (headers only), pair tensors by name and validate."""
    rules = AlphaRules.build(list(scales), layer_scales, list(exclude))
    options = Options(copy_unmatched=copy_unmatched, allow_added_rows=allow_added_rows, allow_nonfinite=allow_nonfinite)
    return build_plan(Checkpoint.open(sft), Checkpoint.open(aligned), tuple(float(a) for a in alphas), rules, options)


def extrapolate(sft: str, aligned: str, alphas: Sequence[float], out: str, *, chunk_mib: float = DEFAULT_CHUNK_MIB,
                address: str | None = None, show_progress: bool = True, sha256: bool = False,
                **plan_options) -> ExtrapolationResult:
    """Write one committed variant folder per alpha under `out` (files recorded with BLAKE3, and
    sha256 too if `sha256`)."""
    plan = make_plan(sft, aligned, alphas, **plan_options)
    return run_plan(plan, out, chunk_mib=chunk_mib, address=address, show_progress=show_progress, sha256=sha256)


def evaluate(variants: str, prompts, reward_model: str, *, out: str | None = None, sampling: dict | None = None,
             include_sft: bool = False, address: str | None = None, **engine) -> dict:
    """Generate answers with every committed variant under `variants` (and alpha 0, the aligned
    model), score them with `reward_model`, write responses and the report; return the report.

    `prompts`: a PromptSet (:func:`load_prompts`) or what load_prompts takes ("ultrafeedback",
    "alpaca_eval", a file). `sampling`: SamplingSettings fields (default: the ExPO paper's).
    `engine`: EngineSettings fields (tp, reward_tp, max_model_len, dtype, trust_remote_code, ...).
    """
    from .evaluate.pipeline import EngineSettings, evaluate_variants
    from .evaluate.prompts import load_prompts

    prompts = load_prompts(prompts) if isinstance(prompts, str) else prompts
    return evaluate_variants(variants, prompts, reward_model, sampling=dict(sampling or {}),
                             settings=EngineSettings(**engine), out_uri=out, include_sft=include_sft, address=address)


def search(sft: str, aligned: str, prompts, reward_model: str, *, out: str, alphas: Sequence[float] | None = None,
           budget: int | None = None, initial_prompts: int | None = None, sampling: dict | None = None,
           materialize: bool = True, plan_options: dict | None = None, address: str | None = None,
           **engine) -> dict:
    """Adaptive alpha search on one engine that swaps weights in place (report under `out`/search);
    with `materialize`, the best alpha is then written and verified under `out`. Returns the
    report, with "materialized": the variant URIs written."""
    from .evaluate.pipeline import EngineSettings
    from .evaluate.prompts import load_prompts
    from .evaluate.search import SearchSettings, materialize as write_variants, search_alpha

    prompts = load_prompts(prompts) if isinstance(prompts, str) else prompts
    settings = SearchSettings(budget=budget, initial_prompts=initial_prompts,
                              **({"grid": tuple(float(a) for a in alphas)} if alphas is not None else {}))
    report = search_alpha(sft, aligned, prompts, reward_model, out_uri=out, sampling=dict(sampling or {}),
                          settings=EngineSettings(**engine), search=settings, plan_options=plan_options,
                          address=address)
    report["materialized"] = (write_variants(sft, aligned, [report["best"]["alpha"]], out, plan_options=plan_options,
                                             address=address, show_progress=False) if materialize else [])
    return report
