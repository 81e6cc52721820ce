"""``expo-ray lineage`` for an adapter: the relative change ||dW|| / ||theta_sft|| per layer group.

The SFT norms come from the usual Ray tasks (:func:`expo_ray.extrapolation.lineage.lineage` on
the SFT model against itself); the delta norms from the adapter alone, without building any
delta: ``||s * B @ A||_F^2 = s^2 * sum((B^T B) * (A A^T))`` (r x r matrices). A tensor the adapter
also holds whole is compared with the SFT one element by element.
"""
from __future__ import annotations

import numpy as np

from ..checkpoint.folder import Checkpoint, TensorLocation
from ..checkpoint.safetensors_io import FLOAT_DTYPES, decode_floats
from ..extrapolation.lineage import GroupChange, group_of, lineage
from ..extrapolation.plan import EXTRAPOLATE, AlphaRules, Plan, ShardPlan, TensorPlan
from ..options import PlanOptions
from .adapter import open_adapter
from .merge import LoraDelta, load_matrix
from .validate import fit_adapter


def _delta_sums(adapter, fit, sft: Checkpoint) -> dict[str, float]:
    """SFT tensor name -> ||theta_aligned - theta_sft||^2 (float64)."""
    sums: dict[str, float] = {}
    whole = {r.sft.info.name: r for r in fit.replacements}
    for t in fit.targets:
        if t.sft.info.name in whole:
            continue
        a, b = load_matrix(adapter.source, t.lora.a), load_matrix(adapter.source, t.lora.b)
        sums[t.sft.info.name] = t.lora.scale ** 2 * float(np.sum((b.T @ b) * (a @ a.T)))
        if t.sft_bias is not None and t.sft_bias.info.name not in whole:
            bias = load_matrix(adapter.source, t.lora.bias)
            sums[t.sft_bias.info.name] = t.lora.scale ** 2 * float(bias @ bias)
    targets = {t.sft.info.name: t for t in fit.targets}
    for name, r in whole.items():  # theta(0) of the merged form, against the SFT tensor
        t = targets.get(name)
        loc = sft.tensors[name]
        with sft.source.open_reader(loc.shard) as reader:
            s_bytes = reader.read(loc.info.start, loc.info.nbytes)
        spec = dict(scale=t.lora.scale, a=t.lora.a, b=t.lora.b, transposed=t.transposed) if t else {}
        delta = LoraDelta(name, adapter.source, loc.info.dtype, tuple(loc.info.shape), whole=r.whole.info, **spec)
        (theta,) = delta.chunk(0, loc.info.numel, s_bytes, [0.0])
        diff = decode_floats(theta.tobytes(), loc.info.dtype).astype(np.float64) - \
            decode_floats(s_bytes, loc.info.dtype).astype(np.float64)
        sums[name] = float(diff @ diff)
    return sums


def adapter_lineage(sft_uri: str, adapter_uri: str, address: str | None = None
                    ) -> tuple[list[GroupChange], GroupChange]:
    """Per-group relative change (in model order) and the overall one of the adapter on the SFT model."""
    sft, adapter = Checkpoint.open(sft_uri), open_adapter(adapter_uri)
    fit = fit_adapter(adapter, sft)
    shards = tuple(ShardPlan(key, tuple(TensorPlan(i.name, i.dtype, i.shape, TensorLocation(key, i),
                                                   TensorLocation(key, i), EXTRAPOLATE)
                                        for i in header.tensors if i.dtype in FLOAT_DTYPES))
                   for key, header in sft.headers.items())
    itself = Plan(sft.uri, sft.uri, (1.0,), AlphaRules(), PlanOptions(), shards, (), sft.has_index, "", {},
                  {"sft": sft.source, "aligned": sft.source})
    groups, overall = lineage(itself, address)  # every delta 0, the SFT norms per group
    by_group = {g.group: g for g in groups}
    for name, d2 in _delta_sums(adapter, fit, sft).items():
        by_group[group_of(name)].delta_sq += d2
        overall.delta_sq += d2
    return groups, overall
