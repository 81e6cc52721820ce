"""Proof that a weight swap left the engine computing what a fresh load of the same weights would.

Runs inside every vLLM worker (tensor-parallel rank), called through the worker extension of
:mod:`.weight_swap`. Two views of a model are compared:

* **what its layers compute**: every linear, embedding, lm_head and fused-MoE layer applied to a
  fixed, seeded input through the layer's own kernel (``quant_method``), so packed copies the
  kernels keep (oneDNN handles on CPU, a tied head's copy, the MoE prepacked layout) are what is
  tested. On CPU, vLLM moves linear weights into such handles and leaves their parameters empty:
  a parameter digest alone proves nothing there.
* **its parameters**: the sha256 of every parameter's bytes.

:func:`fresh_model` builds the reference the way vLLM's model loader builds the engine's model at
start-up (``initialize_model``, the model's ``load_weights``, ``process_weights_after_loading``),
from the same weight source, in the same worker, under its own layer-name prefix; it lives only
for the comparison.
"""
from __future__ import annotations

import gc
import hashlib
import time
from typing import Any, Callable, Iterable

REFERENCE_PREFIX = "expo_swap_reference"
ROWS = 3  # rows of the fixed input each layer is applied to


def _digest(tensor) -> str:
    import torch

    data = tensor.detach().to("cpu").contiguous()
    if data.numel() == 0:
        return f"empty {tuple(tensor.shape)} {data.dtype}"
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def param_digests(model) -> dict[str, str]:
    """Parameter name -> "dtype shape sha256" for every parameter of ``model`` on this rank."""
    return {name: f"{p.dtype} {tuple(p.shape)} {_digest(p)}" for name, p in model.named_parameters()}


def _dtype_of(layer, default):
    for p in layer.parameters(recurse=False):
        if p.is_floating_point():
            return p.dtype
    return default


def _fixed(shape, dtype, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _layer_probe(layer, dtype) -> Callable[[], Any] | None:
    """A function computing ``layer``'s outputs on a fixed input with its own kernel, or None for
    layers without weights of their own that a swap loads."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    quant = getattr(layer, "quant_method", None)
    if quant is None:
        return None
    dtype = _dtype_of(layer, dtype)
    if isinstance(layer, VocabParallelEmbedding):
        def embedding():
            local = layer.num_embeddings_per_partition
            ids = torch.arange(0, local, max(1, local // 7))
            head = quant.apply(layer, _fixed((ROWS, layer.embedding_dim), dtype, 1))
            return quant.embedding(layer, ids), head
        return embedding
    if isinstance(layer, LinearBase):
        def linear():
            width = getattr(layer, "input_size_per_partition", None) or layer.input_size
            bias = None if getattr(layer, "skip_bias_add", False) else getattr(layer, "bias", None)
            return quant.apply(layer, _fixed((ROWS, width), dtype, 2), bias)
        return linear
    if hasattr(layer, "w13_weight") and hasattr(layer, "w2_weight"):
        def experts():
            tokens, k, n = 2 * max(1, layer.local_num_experts), layer.top_k, layer.local_num_experts
            ids = torch.tensor([[(t + j) % n for j in range(k)] for t in range(tokens)], dtype=torch.int32)
            weights = torch.full((tokens, k), 1.0 / k, dtype=torch.float32)
            x = _fixed((tokens, layer.hidden_size), dtype, 3)
            return quant.apply(layer, x, weights, ids, None, None)
        return experts
    return None


def layer_outputs(model, dtype) -> tuple[dict[str, str], list[str]]:
    """Module name -> digest of what it computes on the fixed input, and the module types that
    hold weights but could not be probed (their type and the error)."""
    import torch

    out, unprobed = {}, []
    with torch.no_grad():
        for name, layer in model.named_modules():
            probe = _layer_probe(layer, dtype)
            if probe is None:
                continue
            try:
                result = probe()
            except Exception as exc:  # noqa: BLE001 - a kernel this probe does not know how to call
                unprobed.append(f"{name} ({type(layer).__name__}: {type(exc).__name__}: {exc})"[:300])
                continue
            parts = result if isinstance(result, tuple) else (result,)
            out[_unprefixed(name)] = " ".join(_digest(p) for p in parts)
    return out, unprobed


def _unprefixed(name: str) -> str:
    return name[len(REFERENCE_PREFIX) + 1:] if name.startswith(REFERENCE_PREFIX + ".") else name


def fingerprint(model, dtype) -> dict:
    """What :func:`compare` compares: layer outputs and parameter digests of ``model``."""
    outputs, unprobed = layer_outputs(model, dtype)
    return {"outputs": outputs, "params": param_digests(model), "unprobed": unprobed}


def compare(serving: dict, reference: dict) -> list[str]:
    """Every layer output and parameter that differs between two fingerprints (empty: equal)."""
    differ = []
    for kind in ("outputs", "params"):
        a, b = serving[kind], reference[kind]
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                what = "output of" if kind == "outputs" else "parameter"
                differ.append(f"{what} {name}" + ("" if name in a and name in b else " (only in one)"))
    return differ


def fresh_model(vllm_config, weights: Iterable[tuple[str, Any]]):
    """The model vLLM's loader would build from ``weights`` (whole checkpoint tensors) in this
    worker: the reference for a swap."""
    import torch
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_config = vllm_config.model_config
    load_device = vllm_config.load_config.device or vllm_config.device_config.device
    device = torch.device(load_device)
    with set_default_torch_dtype(model_config.dtype):
        with device:
            model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=REFERENCE_PREFIX)
        model.load_weights(weights)
        process_weights_after_loading(model, model_config, device)
    return model.eval()


def forget_reference(vllm_config) -> None:
    """Remove what building the reference registered in the engine's configuration."""
    compilation = vllm_config.compilation_config
    for key in [k for k in compilation.static_forward_context if k.startswith(REFERENCE_PREFIX)]:
        del compilation.static_forward_context[key]
    moe = getattr(compilation, "static_all_moe_layers", None)
    if moe is not None:
        moe[:] = [k for k in moe if not k.startswith(REFERENCE_PREFIX)]
    gc.collect()


def check_against_fresh_load(vllm_config, serving_model, weights: Iterable[tuple[str, Any]]) -> dict:
    """Compare the serving model with a fresh load of ``weights`` on this rank."""
    began = time.perf_counter()
    dtype = vllm_config.model_config.dtype
    serving = fingerprint(serving_model, dtype)
    try:
        reference = fingerprint(fresh_model(vllm_config, weights), dtype)
    finally:
        forget_reference(vllm_config)  # also after a failed load: nothing of the reference stays registered
    return {"differ": compare(serving, reference), "unprobed": serving["unprobed"],
            "layers": len(serving["outputs"]), "params": len(serving["params"]),
            "seconds": round(time.perf_counter() - began, 3)}
