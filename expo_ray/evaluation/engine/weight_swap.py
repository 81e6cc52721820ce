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
and post-load processing exactly as at start-up. With tensor parallelism each rank reads and
computes only the part of each tensor its layer keeps (see :func:`rank_slices`): rows of the
column-parallel linears (q/k/v, gate/up) and of the vocabulary-parallel embeddings and lm_head,
columns of the row-parallel linears (o_proj, down_proj), replicated tensors whole. The slice goes
to the loader inside a full-shape tensor whose other elements are never touched (an untouched
allocation costs no memory pages), so the loader's own narrowing picks exactly the computed part.
A layer type whose sharding is not known here is loaded whole (one log line per swap). At 70B
(bf16, TP=8) a rank then reads about 2 x 17.6 GB instead of 2 x 140 GB per swap; see docs/scale.md.

:func:`weight_signature` and :func:`signature_problems` are the check made *before* a swap: the
new weights must have exactly the tensor names, shapes and dtypes of the checkpoint the engine
was started on, so a mismatched checkpoint is refused while the engine keeps serving.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np

from ...checkpoint.folder import Checkpoint
from ...errors import ExpoError
from ...extrapolation import theta
from ...extrapolation.plan import Plan, make_plan
from ...extrapolation.theta import Slice
from ...options import PlanOptions

log = logging.getLogger("expo_ray")

WORKER_EXTENSION = "expo_ray.evaluation.engine.weight_swap.WeightSwapExtension"
MAX_LISTED = 10

_TORCH_DTYPES = {  # safetensors dtype code -> torch dtype name
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


class WeightsMismatch(ExpoError):
    """The new weights do not fit the model the engine serves."""


def folder_source(path: str) -> dict:
    return {"folder": str(path)}


def extrapolated_source(sft: str, aligned: str, alpha: float, plan: PlanOptions = PlanOptions()) -> dict:
    """theta(alpha) of (sft, aligned) with the alpha rules and policies of ``plan``."""
    return {"sft": str(sft), "aligned": str(aligned), "alpha": float(alpha), "plan": plan.to_dict()}


def describe_source(source: dict) -> str:
    if "folder" in source:
        return source["folder"]
    return f"theta(alpha={source['alpha']:g}) of {source['aligned']} (aligned) and {source['sft']} (sft)"


def _plan(source: dict) -> Plan:
    return make_plan(source["sft"], source["aligned"], (source["alpha"],), PlanOptions.from_dict(source.get("plan")))


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


def _part_shape(shape: tuple[int, ...], part: Slice) -> tuple[int, ...]:
    if part is None:
        return tuple(shape)
    kind, start, end = part
    return (end - start, *shape[1:]) if kind == "rows" else (shape[0], end - start)


def _placed(bits, dtype: str, shape: tuple[int, ...], part: Slice):
    """A torch tensor of the full ``shape`` holding ``bits`` at ``part`` (the rest never touched)."""
    import torch

    piece = _to_torch(bits, dtype, _part_shape(shape, part))
    if part is None:
        return piece
    full = torch.empty(shape, dtype=piece.dtype)
    kind, start, end = part
    if kind == "rows":
        full[start:end] = piece
    else:
        full[:, start:end] = piece
    return full


def iter_weights(source: dict, part_of=None, stats: dict | None = None) -> Iterator[tuple[str, Any]]:
    """(name, torch tensor) for every tensor ``source`` gives, one tensor in memory at a time.
    ``part_of(name)`` (default: whole tensors) says which part of each tensor to read and
    compute; the other elements of the tensor given are left unset. ``stats`` counts bytes read,
    elements computed and tensors given in part or whole."""
    part_of = part_of or (lambda name: None)
    stats = stats if stats is not None else theta.Stats()
    if "folder" in source:
        tensors = theta.iter_stored(Checkpoint.open(source["folder"]), part_of, stats)
    else:
        tensors = theta.iter_theta(_plan(source), float(source["alpha"]), part_of, stats)
    for name, dtype, shape, part, bits in tensors:
        yield name, _placed(bits, dtype, shape, part)


def rank_slices(model, architecture: str) -> tuple[Any, list[str]]:
    """``part_of(checkpoint tensor name)`` for this tensor-parallel rank: the part of each tensor
    its vLLM layer keeps (what the layer's weight loader narrows to, by the layer's own
    ``tp_rank``/``tp_size``: a layer vLLM keeps whole on every rank, ``disable_tp``, is read
    whole), and the layer types whose sharding is not known here (their tensors are read whole).
    Only for architectures whose stored tensors are laid out like vLLM's parameters
    (:data:`.swap_policy.SLICED_READS`); for others every tensor is read whole."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from .swap_policy import SLICED_READS

    if architecture not in SLICED_READS:
        return (lambda name: None), set()
    modules = dict(model.named_modules())
    packed = {sub: (fused, i) for fused, subs in (getattr(model, "packed_modules_mapping", None) or {}).items()
              for i, sub in enumerate(subs)}
    unknown: set[str] = set()

    def part_of(name: str) -> Slice:
        prefix, _, param = name.rpartition(".")
        layer, index = modules.get(prefix), None
        if layer is None:
            parent, _, leaf = prefix.rpartition(".")
            if leaf in packed:
                fused, index = packed[leaf]
                layer = modules.get(f"{parent}.{fused}" if parent else fused)
        if layer is None:
            return None
        quant = getattr(layer, "quant_method", None)
        if quant is not None and type(quant).__name__ not in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"):
            unknown.add(f"{type(layer).__name__} ({type(quant).__name__})")
            return None
        if isinstance(layer, VocabParallelEmbedding):
            idx = layer.shard_indices
            whole = idx.org_vocab_start_index == 0 and idx.org_vocab_end_index >= layer.org_vocab_size
            return None if whole else ("rows", idx.org_vocab_start_index, idx.org_vocab_end_index)
        rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
        if size == 1 or isinstance(layer, ReplicatedLinear) or type(layer).__name__.endswith("Norm"):
            return None
        if isinstance(layer, RowParallelLinear):
            n = layer.input_size_per_partition
            return ("cols", rank * n, rank * n + n) if param == "weight" else None
        if isinstance(layer, QKVParallelLinear) and index is not None:
            if index == 0:
                n, at = layer.num_heads * layer.head_size, rank
            else:
                head = layer.head_size if index == 1 else getattr(layer, "v_head_size", layer.head_size)
                n, at = layer.num_kv_heads * head, rank // layer.num_kv_head_replicas
            return ("rows", at * n, at * n + n)
        if isinstance(layer, MergedColumnParallelLinear) and index is not None:
            n = layer.output_sizes[index] // size
            return ("rows", rank * n, rank * n + n)
        if type(layer) is ColumnParallelLinear:
            n = layer.output_size_per_partition
            return ("rows", rank * n, rank * n + n)
        unknown.add(type(layer).__name__)
        return None

    return part_of, unknown


def _tied_embeddings(model) -> list:
    """Embedding-type layers (a tied lm_head and the embedding it shares its weight with) whose
    kernels keep a copy of a weight another layer also holds: a reload loads the weight through
    one of them only, so the other's copy must be made again."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    holders: dict[int, list] = {}
    for layer in model.modules():
        for param in layer._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(layer)
    return [layer for group in holders.values() if len(group) > 1 for layer in group
            if isinstance(layer, VocabParallelEmbedding)]


def _fused_moe_methods(model) -> list:
    return [layer.quant_method for layer in model.modules()
            if getattr(getattr(layer, "quant_method", None), "moe_kernel", None) is not None]


def _architecture(worker) -> str:
    from .swap_policy import architecture

    hf_config = worker.vllm_config.model_config.hf_config
    return architecture({"architectures": getattr(hf_config, "architectures", None),
                         "model_type": getattr(hf_config, "model_type", None)})


class WeightSwapExtension:
    """Mixed into vLLM's worker class; called on every rank with ``llm.collective_rpc``."""

    def expo_swap_weights(self, source: dict) -> dict:
        """Load the weights ``source`` describes in place; returns what this rank read, computed
        and loaded.

        vLLM's ``reload_weights`` does the loading (its weight loaders shard for tensor
        parallelism and run each layer's post-load processing), but two things a fresh load does
        it skips, and they are redone here: a fused-MoE layer's kernel set-up on a weight update
        (on CPU the prepacking of the experts: without it the kernel reads checkpoint layout), and
        the packed copy a tied lm_head's kernel keeps (the head receives no weights of its own).
        """
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        began = time.perf_counter()
        model = self.model_runner.get_model()
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        part_of, unknown = rank_slices(model, _architecture(self))
        stats = theta.Stats()
        counted = {"tensors": 0, "bytes": 0}

        def counting():
            for name, tensor in iter_weights(source, part_of, stats):
                counted["tensors"] += 1
                counted["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        tied = _tied_embeddings(model)
        for method in _fused_moe_methods(model):
            method.moe_kernel = None  # the reload then sets the kernel up as the first load did
        try:
            self.reload_weights(weights_iterator=counting())
        except BaseException:
            _abandon_layerwise_reload(model)
            raise
        for layer in tied:
            layer.quant_method.process_weights_after_loading(layer)
        if unknown:
            log.warning("weight swap, rank %d of %d: %s sharding not known here; their tensors were read whole",
                     rank, size, ", ".join(sorted(unknown)))
        return {**counted, **stats, "rank": rank, "seconds": round(time.perf_counter() - began, 3)}

    def expo_check_swap(self, source: dict) -> dict:
        """Compare what this rank's model computes and holds with a fresh load of ``source`` by
        vLLM's own loader (see :mod:`.swap_check`)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from .swap_check import check_against_fresh_load

        result = check_against_fresh_load(self.vllm_config, self.model_runner.get_model(), iter_weights(source))
        return {**result, "rank": get_tensor_model_parallel_rank()}

    def expo_fingerprint(self) -> dict:
        """This rank's layer outputs on the fixed input and parameter digests (see :mod:`.swap_check`)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from .swap_check import fingerprint

        return {**fingerprint(self.model_runner.get_model(), self.vllm_config.model_config.dtype),
                "rank": get_tensor_model_parallel_rank()}


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
