"""The values transformers gives config.json keys that a file leaves out (or writes as null).

Two saves of one model by different transformers versions differ in which defaults they write:
one config has ``"head_dim": 128`` or ``"tie_word_embeddings": false``, the other omits the key.
Configs are compared after :func:`filled` puts in, for the keys below, the value transformers
uses when the key is absent. The table is transformers' own (checked against the installed
version by ``tests/test_plan.py::test_config_defaults_are_transformers_defaults``); a model type
not listed keeps its keys as written, so an absent key still differs from a written one.

    model_type                          head_dim         num_key_value_heads   tie_word_embeddings
    llama, phi3, olmo2, granite         hidden / heads   heads                 false
    mistral, mixtral, ministral         hidden / heads   8                     false
    qwen2                               hidden / heads   32                    false
    qwen2_moe                           hidden / heads   16                    false
    qwen3                               128              32                    false
    qwen3_moe                           hidden / heads   4                     false
    gemma                               256              16                    true
    gemma2, gemma3_text                 256              4                     true
    starcoder2                          hidden / heads   2                     true
    deepseek_v3                         64               128                   false

("hidden / heads" is ``hidden_size // num_attention_heads``; "heads" is ``num_attention_heads``.)
"""
from __future__ import annotations

HIDDEN_PER_HEAD = "hidden / heads"
HEADS = "heads"

_LLAMA = {"head_dim": HIDDEN_PER_HEAD, "num_key_value_heads": HEADS, "tie_word_embeddings": False}
_MISTRAL = {"head_dim": HIDDEN_PER_HEAD, "num_key_value_heads": 8, "tie_word_embeddings": False}
_GEMMA2 = {"head_dim": 256, "num_key_value_heads": 4, "tie_word_embeddings": True}

DEFAULTS: dict[str, dict] = {
    "llama": _LLAMA, "phi3": _LLAMA, "olmo2": _LLAMA, "granite": _LLAMA,
    "mistral": _MISTRAL, "mixtral": _MISTRAL, "ministral": _MISTRAL,
    "qwen2": {"head_dim": HIDDEN_PER_HEAD, "num_key_value_heads": 32, "tie_word_embeddings": False},
    "qwen2_moe": {"head_dim": HIDDEN_PER_HEAD, "num_key_value_heads": 16, "tie_word_embeddings": False},
    "qwen3": {"head_dim": 128, "num_key_value_heads": 32, "tie_word_embeddings": False},
    "qwen3_moe": {"head_dim": HIDDEN_PER_HEAD, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "gemma": {"head_dim": 256, "num_key_value_heads": 16, "tie_word_embeddings": True},
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "starcoder2": {"head_dim": HIDDEN_PER_HEAD, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "deepseek_v3": {"head_dim": 64, "num_key_value_heads": 128, "tie_word_embeddings": False},
}


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def filled(config: dict | None) -> dict:
    """`config` with the keys of the table above that it leaves out (or writes as null) filled in
    as transformers fills them; other keys, and configs of other model types, as written."""
    config = dict(config or {})
    defaults = DEFAULTS.get(config.get("model_type")) if isinstance(config.get("model_type"), str) else None
    if not defaults:
        return config
    hidden, heads = _int(config.get("hidden_size")), _int(config.get("num_attention_heads"))
    for key, default in defaults.items():
        if config.get(key) is not None:
            continue
        if default == HIDDEN_PER_HEAD:
            if hidden is None or not heads:
                continue
            default = hidden // heads
        elif default == HEADS:
            if heads is None:
                continue
            default = heads
        config[key] = default
    return config
