"""`expo-ray demo`: the extrapolation pipeline end to end on tiny models built on the spot.

Builds a tiny Llama SFT model and an aligned model derived from it (sharded differently),
checks their lineage, extrapolates several alphas on a local Ray, verifies every variant
against its manifest and shows how far each variant moved from the aligned model.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from ..api import extrapolate, make_plan
from ..checkpoint import Checkpoint
from ..lineage import lineage, lineage_warnings
from ..manifest import verify_variant
from ..plan import variant_name
from ..safetensors_io import decode_floats
from ..storage import LocalStorage

log = logging.getLogger("expo_ray")
DEFAULT_ALPHAS = (0.0, 0.1, 0.3, 0.5, 1.0)


def _distance(a: Checkpoint, b: Checkpoint) -> float:
    """Relative L2 distance ||b - a|| / ||a|| over all float tensors (tiny models only)."""
    num = den = 0.0
    for name, loc in a.tensors.items():
        other = b.tensors[name]
        with a.storage.open_reader(loc.shard) as ra, b.storage.open_reader(other.shard) as rb:
            x = decode_floats(ra.read(loc.info.start, loc.info.nbytes), loc.info.dtype).astype("float64")
            y = decode_floats(rb.read(other.info.start, other.info.nbytes), other.info.dtype).astype("float64")
        num += float(((y - x) ** 2).sum())
        den += float((x ** 2).sum())
    return math.sqrt(num / den) if den else 0.0


def run_demo(workdir: str | Path, alphas=DEFAULT_ALPHAS, seed: int = 0, show_progress: bool = True) -> dict:
    from .tiny import build_tiny_pair

    workdir = Path(workdir).resolve()
    models = workdir / "models"
    began = time.perf_counter()
    if not (models / "aligned" / "config.json").exists():
        log.info("building a tiny SFT model and an aligned model derived from it in %s", models)
        build_tiny_pair(models, dtype="bfloat16", seed=seed, num_hidden_layers=4)
    if not (models / "reward" / "config.json").exists():
        from .tiny_reward import build_tiny_reward_model

        build_tiny_reward_model(models / "reward", seed=seed)  # for jobs/sweeps/cpu-smoke.yaml
    prompts = workdir / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"Tell me about the number {i}."}) + "\n"
                                   for i in range(64)))
    sft, aligned = str(models / "sft"), str(models / "aligned")

    groups, overall = lineage(make_plan(sft, aligned, (1.0,)))
    out = workdir / "variants"
    result = extrapolate(sft, aligned, alphas, str(out), command="expo-ray demo", show_progress=show_progress)
    aligned_ckpt = Checkpoint.open(aligned)
    rows = []
    for alpha in alphas:
        folder = out / variant_name(alpha)
        check = verify_variant(LocalStorage(folder))
        rows.append({
            "alpha": alpha, "variant": str(folder), "verified": check.ok,
            "state": result.variants[variant_name(alpha)],
            "distance_from_aligned": _distance(aligned_ckpt, Checkpoint.open(str(folder))),
        })
    summary = {
        "models": {"sft": sft, "aligned": aligned},
        "lineage": {"overall": overall.relative, "warnings": lineage_warnings(groups, overall)},
        "variants": rows,
        "seconds": time.perf_counter() - began,
    }
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return summary
