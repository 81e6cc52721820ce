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
