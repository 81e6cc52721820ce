"""A tiny, real reward model (a one-label sequence classifier) built locally, for tests and the demo.

The reward models ExPO uses (e.g. RM-Mistral-7B) are ``*ForSequenceClassification`` checkpoints
with ``num_labels == 1``: the raw logit of the last token is the reward. :func:`build_tiny_reward_model`
saves one of the same kind, deterministic from a seed, on CPU, downloading nothing: a
``LlamaForSequenceClassification`` (hidden 64, two heads of 32, so head_dim = 32 as vLLM on CPU
requires) with ``pad_token_id`` set (transformers needs it to find the last token of each row), as
safetensors, with the tokenizer and chat template of :func:`expo_ray.demo.tiny.build_tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny import DEFAULT_VOCAB_SIZE, _dtype, _quiet_progress_bars, _set_config_dtype, build_tokenizer, tiny_config

__all__ = ["build_tiny_reward_model"]


def build_tiny_reward_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    dtype: str | torch.dtype = "float32",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    score_std: float = 1.0,
) -> Path:
    """Save a tiny ``LlamaForSequenceClassification`` reward model (one label) into ``out_dir``.

    Weights are random from ``seed``; the score head is drawn with standard deviation
    ``score_std`` (not the usual 0.02) so different answers get visibly different rewards.
    ``dtype`` is the stored dtype (float32 by default, so vLLM and transformers can be compared
    tightly). Writes ``model.safetensors``, ``config.json`` (``architectures =
    ["LlamaForSequenceClassification"]``, ``num_labels = 1``, ``pad_token_id`` = the tokenizer's
    ``<pad>``) and the tokenizer files with a chat template. Returns ``out_dir``.
    """
    from transformers import AutoModelForSequenceClassification

    torch_dtype = _dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(
        "llama", vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, dtype=torch_dtype,
    )
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = 1
    config.problem_type = "regression"
    assert config.pad_token_id is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.score.weight.normal_(0.0, score_std)
    model.eval()
    model = model.to(torch_dtype)
    _set_config_dtype(model.config, torch_dtype)
    with _quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out, vocab_size=vocab_size, model_max_length=config.max_position_embeddings)
    return out
