"""New weights for a running vLLM engine, without restarting it.

A weight source is a small JSON-able dict, so it can travel through ``LLM.collective_rpc`` (tensors
cannot: they would be serialized). Every vLLM worker (every tensor-parallel rank) turns it into
tensors itself, reading local files:

* ``{"folder": PATH}``: the tensors of a committed checkpoint folder, as stored;
* ``{"sft": PATH, "aligned": PATH, "alpha": A, "plan": {...}}``: theta(alpha) = aligned +
  alpha * (aligned - sft), computed tensor by tensor with the same plan (pairing by name, alpha
  rules) and the same correctly rounded kernel as ``expo-ray extrapolate``, so the weights are
  bit-identical to the variant that extrapolation would write.

:class:`WeightSwapExtension` is mixed into vLLM's worker class (``LLM(...,
worker_extension_cls=WORKER_EXTENSION)``). It hands the tensors to the worker's own
``reload_weights(weights_iterator=...)``, so vLLM's weight loaders do the tensor-parallel sharding
and post-load processing exactly as at start-up. Each rank computes full tensors and keeps the
slice its loaders take: at 70B (bf16, TP=8) every swap reads both checkpoints (280 GB, from the
node's page cache after the first rank) and each rank spends about two minutes of one core in the
kernel (estimated from its measured 1.64 ns per element), against writing 140 GB to storage and
starting a new engine.

:func:`weight_signature` and :func:`signature_problems` are the check made *before* a swap: the
new weights must have exactly the tensor names, shapes and dtypes of the checkpoint the engine
was started on, so a mismatched checkpoint is refused while the engine keeps serving.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np

from .. import kernel
from ..checkpoint import Checkpoint
from ..errors import ExpoError
from ..plan import COPY_IDENTICAL, EXTEND_ROWS, EXTRAPOLATE, Plan
from ..safetensors_io import read_tensor

WORKER_EXTENSION = "expo_ray.evaluate.weight_swap.WeightSwapExtension"
MAX_LISTED = 10

_TORCH_DTYPES = {  # safetensors dtype code -> torch dtype name
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


class WeightsMismatch(ExpoError):
    """The new weights do not fit the model the engine serves."""


def folder_source(path: str) -> dict:
    return {"folder": str(path)}


def extrapolated_source(sft: str, aligned: str, alpha: float, plan_options: dict | None = None) -> dict:
    """``plan_options`` are :func:`expo_ray.api.make_plan`'s keyword arguments (alpha rules,
    ``copy_unmatched``, ``allow_added_rows``)."""
    return {"sft": str(sft), "aligned": str(aligned), "alpha": float(alpha), "plan": dict(plan_options or {})}


def describe_source(source: dict) -> str:
    if "folder" in source:
        return source["folder"]
    return f"theta(alpha={source['alpha']:g}) of {source['aligned']} (aligned) and {source['sft']} (sft)"


def _plan(source: dict) -> Plan:
    from ..api import make_plan

    return make_plan(source["sft"], source["aligned"], (source["alpha"],), **source.get("plan", {}))


def weight_signature(source: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of the weights ``source`` gives (reads headers only)."""
    if "folder" in source:
        ckpt = Checkpoint.open(source["folder"])
        return {name: (loc.info.dtype, tuple(loc.info.shape)) for name, loc in ckpt.tensors.items()}
    plan = _plan(source)
    return {t.name: (t.dtype, tuple(t.shape)) for shard in plan.shards for t in shard.tensors}


def signature_problems(serving: dict, new: dict) -> list[str]:
    """Every way ``new`` differs from ``serving`` (empty when the weights fit)."""
    problems = [f"tensor {n}: not in the served model" for n in sorted(set(new) - set(serving))]
    problems += [f"tensor {n}: missing (the served model has it)" for n in sorted(set(serving) - set(new))]
    for name in sorted(set(new) & set(serving)):
        (d0, s0), (d1, s1) = serving[name], new[name]
        if (d0, s0) != (d1, s1):
            problems.append(f"tensor {name}: {d1} {list(s1)}, the served model has {d0} {list(s0)}")
    return problems


def check_fits(serving: dict, source: dict, serving_label: str) -> None:
    """Raise :class:`WeightsMismatch` listing the differences if ``source`` does not fit."""
    problems = signature_problems(serving, weight_signature(source))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise WeightsMismatch(
            f"{describe_source(source)}: does not fit the engine serving {serving_label}:\n  "
            + "\n  ".join(problems[:MAX_LISTED]) + more)


def _to_torch(bits: np.ndarray | bytes, dtype: str, shape: tuple[int, ...]):
    import torch

    target = getattr(torch, _TORCH_DTYPES[dtype])
    if isinstance(bits, (bytes, bytearray, memoryview)):
        tensor = torch.frombuffer(bytearray(bits), dtype=target) if len(bits) else torch.empty(0, dtype=target)
    else:
        tensor = torch.from_numpy(bits).view(target)
    return tensor.reshape(shape)


def _readers(storage):
    opened: dict = {}

    def reader(shard: str):
        if shard not in opened:
            opened[shard] = storage.open_reader(shard)
        return opened[shard]
    return reader, opened


def iter_weights(source: dict) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) for every tensor ``source`` gives, one tensor in memory at a time."""
    if "folder" in source:
        ckpt = Checkpoint.open(source["folder"])
        reader, opened = _readers(ckpt.storage)
        try:
            for name, loc in ckpt.tensors.items():
                yield name, _to_torch(read_tensor(reader(loc.shard), loc.info), loc.info.dtype, loc.info.shape)
        finally:
            for r in opened.values():
                r.close()
        return
    yield from _iter_extrapolated(_plan(source), float(source["alpha"]))


def _iter_extrapolated(plan: Plan, alpha: float) -> Iterator[tuple[str, Any]]:
    from ..shard_task import compute_chunk
    from ..storage import open_storage

    a_reader, a_open = _readers(open_storage(plan.aligned_uri))
    s_reader, s_open = _readers(open_storage(plan.sft_uri))
    try:
        for shard in plan.shards:
            for t in shard.tensors:
                a_bytes = read_tensor(a_reader(t.aligned.shard), t.aligned.info)
                effective = alpha * t.scale
                if t.action == COPY_IDENTICAL:
                    if a_bytes != read_tensor(s_reader(t.sft.shard), t.sft.info):
                        raise ExpoError(f"tensor {t.name} ({t.dtype}, not a float type) differs between the SFT "
                                        "and aligned models; non-float tensors must be identical")
                if t.action in (EXTRAPOLATE, EXTEND_ROWS) and effective != 0.0:
                    s_bytes = read_tensor(s_reader(t.sft.shard), t.sft.info)
                    bits = kernel.bits_dtype(t.dtype)
                    count = t.aligned.info.numel
                    (out,) = compute_chunk(t, bits, a_bytes, s_bytes, [effective], count, [None], 0)
                    yield t.name, _to_torch(out, t.dtype, t.shape)
                else:
                    yield t.name, _to_torch(a_bytes, t.dtype, t.shape)
    finally:
        for r in list(a_open.values()) + list(s_open.values()):
            r.close()


class WeightSwapExtension:
    """Mixed into vLLM's worker class; called on every rank with ``llm.collective_rpc``."""

    def expo_swap_weights(self, source: dict) -> dict:
        """Load the weights ``source`` describes in place; returns what this rank loaded."""
        began = time.perf_counter()
        counted = {"tensors": 0, "bytes": 0}

        def counting():
            for name, tensor in iter_weights(source):
                counted["tensors"] += 1
                counted["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        try:
            self.reload_weights(weights_iterator=counting())
        except BaseException:
            _abandon_layerwise_reload(self.model_runner.get_model())
            raise
        return {**counted, "seconds": round(time.perf_counter() - began, 3)}


def _abandon_layerwise_reload(model) -> None:
    """Undo what a failed ``reload_weights`` leaves behind, so that the next reload (of the
    previous weights) starts clean.

    vLLM 0.32 reloads layer by layer (``model_executor/model_loader/reload/layerwise.py``): a
    layer's incoming tensors are buffered while its kernel tensors wait on the meta device. A
    reload that raises leaves unfinished layers in that state, and the next reload would replay
    the buffered (bad) tensors. Here the kernel tensors go back in place and the buffers are
    dropped. These are vLLM internals: checked against 0.32 by tests/test_weight_swap.py.
    """
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _place_kernel_tensors

    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:
            _place_kernel_tensors(layer, info)
        info.reset()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
