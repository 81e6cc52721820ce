"""Does the aligned model descend from this SFT model? Per-layer relative weight change.

||theta_aligned - theta_sft|| / ||theta_sft|| per decoder layer (and embeddings, head, rest).
Fine-tuning moves weights by a small fraction; two unrelated models differ by about sqrt(2),
and extrapolating between them collapses the model (ExPO paper), so that case is flagged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checkpoint.safetensors_io import decode_floats
from ..storage import Source
from .plan import COPY_IDENTICAL, LAYER_RE, Plan, ShardPlan

CHUNK_BYTES = 64 * 1024 * 1024
UNRELATED_THRESHOLD = 0.5   # overall relative change above this: not a parent/child pair


@dataclass
class GroupChange:
    group: str
    delta_sq: float
    base_sq: float
    tensors: int

    @property
    def relative(self) -> float:
        if self.base_sq == 0:
            return 0.0 if self.delta_sq == 0 else math.inf
        return math.sqrt(self.delta_sq / self.base_sq)


def group_of(name: str) -> str:
    m = LAYER_RE.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if "embed" in name or name.endswith("wte.weight"):
        return "embeddings"
    if name.startswith("lm_head") or name.endswith("output.weight"):
        return "lm_head"
    return "other"


def shard_sums(shard: ShardPlan, sft: Source, aligned: Source) -> dict[str, tuple[float, float]]:
    """name -> (sum of squared differences, sum of squared SFT weights), float64 accumulation
    (the inputs read at the versions the plan pinned)."""
    sums = {}
    readers = {}
    a_reader = None
    try:
        a_reader = aligned.open_reader(shard.key)
        for t in shard.tensors:
            if t.sft is None or t.action == COPY_IDENTICAL:
                continue
            s_reader = readers.get(t.sft.shard) or readers.setdefault(t.sft.shard, sft.open_reader(t.sft.shard))
            itemsize = t.aligned.info.itemsize
            n = t.sft.info.numel  # rows both models have
            step = max(1, CHUNK_BYTES // itemsize // 2)
            d2 = b2 = 0.0
            for start in range(0, n, step):
                count = min(step, n - start)
                a_bytes = a_reader.read(t.aligned.info.start + start * itemsize, count * itemsize)
                s_bytes = s_reader.read(t.sft.info.start + start * itemsize, count * itemsize)
                a = decode_floats(a_bytes, t.dtype).astype(np.float64)
                s = decode_floats(s_bytes, t.dtype).astype(np.float64)
                diff = a - s
                d2 += float(np.dot(diff, diff))
                b2 += float(np.dot(s, s))
            sums[t.name] = (d2, b2)
    finally:
        if a_reader is not None:  # opening it may be what failed: keep that error
            a_reader.close()
        for r in readers.values():
            r.close()
    return sums


def lineage(plan: Plan, address: str | None = None) -> tuple[list[GroupChange], GroupChange]:
    """Per-group relative change (in model order) and the overall one, computed on Ray."""
    from ..cluster.ray_runtime import ensure_ray, task_options

    ray = ensure_ray(address)
    task = ray.remote(shard_sums).options(**task_options(memory=3 * CHUNK_BYTES + 256 * 1024 * 1024))
    results = ray.get([task.remote(s, plan.sources["sft"], plan.sources["aligned"]) for s in plan.shards])
    groups: dict[str, GroupChange] = {}
    overall = GroupChange("overall", 0.0, 0.0, 0)
    for sums in results:
        for name, (d2, b2) in sums.items():
            g = groups.setdefault(group_of(name), GroupChange(group_of(name), 0.0, 0.0, 0))
            for acc in (g, overall):
                acc.delta_sq += d2
                acc.base_sq += b2
                acc.tensors += 1
    def order(g: GroupChange):
        if g.group.startswith("layer "):
            return (1, int(g.group.split()[1]))
        return ({"embeddings": 0, "other": 2, "lm_head": 3}[g.group], 0)
    return sorted(groups.values(), key=order), overall


def lineage_warnings(groups: list[GroupChange], overall: GroupChange) -> list[str]:
    warnings = []
    broken = [g.group for g in groups if not (math.isfinite(g.delta_sq) and math.isfinite(g.base_sq))]
    if broken:
        return [f"the weights hold NaN or Inf values ({', '.join(broken)}): the relative changes are meaningless, "
                "and extrapolation refuses such inputs unless --allow-nonfinite"]
    if overall.delta_sq == 0:
        warnings.append("the two models are identical: extrapolation would change nothing")
    elif overall.relative > UNRELATED_THRESHOLD:
        warnings.append(
            f"relative change {overall.relative:.3f} is far above what fine-tuning gives (usually well under 0.1): "
            "these do not look like an aligned model and its own SFT parent; extrapolating unrelated models "
            "collapses the result")
    else:
        worst = max(groups, key=lambda g: g.relative)
        if worst.relative > 1.0:
            warnings.append(f"{worst.group} changed by {worst.relative:.3f} (relative): this part looks "
                            "re-initialised, not fine-tuned")
    return warnings
