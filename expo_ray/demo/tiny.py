"""Tiny, real Hugging Face checkpoints built locally, for tests and ``expo-ray demo``.

Everything here is deterministic from a seed, runs on CPU, and downloads nothing:

* :func:`build_tokenizer` trains a byte-level BPE tokenizer with the ``tokenizers`` library on a
  small built-in corpus and saves it the way ``transformers.AutoTokenizer`` loads it (with BOS, EOS
  and PAD tokens and a chat template).
* :func:`build_tiny_pair` saves an "SFT" Llama/Mistral model with random weights and an "aligned"
  model equal to it plus a small random delta (what DPO would give), **sharded differently**.

The models are tiny (hidden 64, two heads of 32, so head_dim = 32 as vLLM on CPU requires).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ROLE_TOKENS",
    "build_tiny_pair",
    "build_tokenizer",
    "corpus",
    "tiny_config",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) + ROLE_TOKENS  # ids 0..5, in this order
DEFAULT_VOCAB_SIZE = 384
# 256 byte-level symbols + the special tokens: the smallest vocabulary BPE can start from.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Zephyr-like: every message ends with EOS, so a generated answer stops at EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}

_ARCHES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_TEXT = """\
The quick brown fox jumps over the lazy dog near the river bank.
A helpful assistant answers questions clearly, honestly and with care.
Please explain how a rainbow forms after the rain stops in the afternoon.
Light bends when it enters a drop of water, then it reflects and bends again.
Write a short poem about the sea, the wind, and the boats that sail at night.
What is the capital of France? The capital of France is Paris.
How many days are there in a week? There are seven days in a week.
Give me three tips for staying healthy: sleep well, eat vegetables, and walk every day.
The model was trained on instructions and then aligned with human preferences.
Good answers are correct, relevant, complete and kind; bad answers are rude or wrong.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in many questions about math.
Summarize the story: a girl finds a map, follows it through the forest, and finds a library.
Translate "good morning" into Spanish: buenos dias. Into German: guten Morgen.
Can you write a function in Python that adds two numbers? def add(a, b): return a + b
Explain the difference between weather and climate in simple words for a child.
The recipe needs flour, sugar, butter, two eggs and a cup of warm milk.
Thank you for your question! Here is a detailed, step by step answer.
I am sorry, but I cannot help with that request because it could cause harm.
"""

_SUBJECTS = ("The teacher", "A student", "My friend", "The robot", "Our team", "The scientist",
             "A farmer", "The doctor", "Every child", "The old man")
_VERBS = ("reads", "writes", "builds", "explains", "finds", "paints", "answers", "studies",
          "measures", "describes")
_OBJECTS = ("a long letter", "the simple question", "a small house", "the new theory",
            "an interesting book", "the bright picture", "every problem", "the hidden garden",
            "a careful plan", "the quiet music")
_PLACES = ("in the morning.", "at school.", "after dinner.", "with great care.", "before noon.",
           "in the city.", "on the weekend.")


def corpus() -> list[str]:
    """The built-in training text for :func:`build_tokenizer` (deterministic, about 80 KB)."""
    lines = _TEXT.splitlines()
    i = 0
    for s in _SUBJECTS:
        for v in _VERBS:
            for o in _OBJECTS:
                lines.append(f"{s} {v} {o} {_PLACES[i % len(_PLACES)]}")
                i += 1
    return lines


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    extra_tokens: Iterable[str] = (),
    model_max_length: int = 2048,
    corpus_lines: Iterable[str] | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer on :func:`corpus` and save it into ``out_dir``.

    ``corpus_lines`` replaces the built-in corpus (e.g. a task's own text, so its words become
    single tokens).

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``),
    ``special_tokens_map.json`` and ``chat_template.jinja``. The vocabulary has exactly
    ``vocab_size`` entries (topped up with ``<|reserved_N|>`` tokens if the corpus runs out of
    merges); ``extra_tokens`` are added after it as special tokens with ids ``vocab_size``,
    ``vocab_size + 1``, ... (as when a chat token is added during alignment). Ids: ``<pad>`` 0,
    ``<s>`` 1, ``</s>`` 2, role tokens 3..5. Encoding adds BOS like Llama tokenizers do; the
    chat template starts with BOS, and ``apply_chat_template`` does not add a second one.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus() if corpus_lines is None else list(corpus_lines)
    tok.train_from_iterator(lines, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < vocab_size:
        tok.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
             for i in range(vocab_size - n)]
        )
    extra = list(extra_tokens)
    if extra:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tok.save(str(out / "tokenizer.json"))

    added = {}
    for token_id, added_token in sorted(tok.get_added_tokens_decoder().items()):
        added[str(token_id)] = {
            "content": added_token.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    dtype: str | torch.dtype = "bfloat16",
):
    """A transformers config for a tiny Llama or Mistral model (head_dim = hidden / heads)."""
    from transformers import LlamaConfig, MistralConfig

    if arch not in _ARCHES:
        raise ValueError(f"unsupported arch {arch!r}; use one of {sorted(_ARCHES)}")
    head_dim = hidden_size // num_attention_heads
    if head_dim * num_attention_heads != hidden_size or head_dim < 32:
        raise ValueError(f"head_dim must be an integer >= 32, got {hidden_size}/{num_attention_heads}")
    ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        initializer_range=0.02,
    )
    cls = LlamaConfig if arch == "llama" else MistralConfig
    config = cls(**kwargs)
    config.architectures = [_ARCHES[arch]]
    _set_config_dtype(config, _dtype(dtype))
    return config


def special_token_ids() -> dict[str, int]:
    """bos_token_id, eos_token_id and pad_token_id of the tiny tokenizer."""
    ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    return {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": ids[EOS_TOKEN], "pad_token_id": ids[PAD_TOKEN]}


def _set_config_dtype(config, dtype: torch.dtype) -> None:
    # transformers >= 4.56 calls it ``dtype``; older versions ``torch_dtype``.
    try:
        config.dtype = dtype
    except Exception:  # noqa: BLE001 - attribute name differs across versions
        config.torch_dtype = dtype


def _new_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


@contextlib.contextmanager
def _quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _shard_bytes(total_bytes: int, shard_size: int | str | None, parts: int) -> int | str:
    if shard_size is not None:
        return shard_size
    # ``parts`` shards of roughly equal size (transformers never splits a tensor).
    return max(1, math.ceil(total_bytes / parts))


def _save_model(model, out_dir: Path, dtype: torch.dtype, shard_size: int | str | None, parts: int) -> Path:
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    _set_config_dtype(model.config, dtype)
    cfg = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied counted once
    with _quiet_progress_bars():
        model.save_pretrained(out_dir, max_shard_size=_shard_bytes(total, shard_size, parts))
    if not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)
    build_tokenizer(out_dir, vocab_size=cfg.vocab_size, model_max_length=cfg.max_position_embeddings)
    return out_dir


def build_tiny_pair(
    out_root: str | os.PathLike,
    *,
    arch: str = "llama",
    dtype: str | torch.dtype = "bfloat16",
    tie_word_embeddings: bool = False,
    sft_shard_size: int | str | None = None,
    aligned_shard_size: int | str | None = None,
    delta_scale: float = 1e-2,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    config=None,
) -> tuple[Path, Path]:
    """Save a tiny SFT model and an aligned model derived from it; return ``(sft_dir, aligned_dir)``.

    ``out_root/sft`` holds a randomly initialised ``LlamaForCausalLM`` (or ``MistralForCausalLM``);
    ``out_root/aligned`` holds the same model plus, for every parameter ``p``,
    ``delta_scale * rms(p) * N(0, 1)`` (a relative, DPO-like change), computed in float32 and then
    both cast to ``dtype``. Shard sizes default to about a third (SFT) and a fifth (aligned) of the
    model, so the two checkpoints have several shards each with different boundaries; pass bytes
    (int) or a transformers size string ("100KB") to choose. Both folders get tokenizer files and
    ``generation_config.json``. ``tie_word_embeddings=True`` stores no ``lm_head.weight``.
    ``config`` (a transformers config; its vocabulary must be ``vocab_size`` tokens, its special
    token ids those of :func:`special_token_ids`) replaces the Llama/Mistral one, for other families.
    """
    torch_dtype = _dtype(dtype)
    root = Path(out_root)
    config = config or tiny_config(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings,
        dtype=torch_dtype,
    )
    sft = _new_model(config, seed)
    aligned = copy.deepcopy(sft)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    with torch.no_grad():
        for _, p in aligned.named_parameters():  # tied parameters appear once
            rms = p.float().pow(2).mean().sqrt().clamp_min(1e-3)
            p.add_(torch.randn(p.shape, generator=gen) * (delta_scale * rms))
    sft_dir = _save_model(sft, root / "sft", torch_dtype, sft_shard_size, 3)
    aligned_dir = _save_model(aligned, root / "aligned", torch_dtype, aligned_shard_size, 5)
    return sft_dir, aligned_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
