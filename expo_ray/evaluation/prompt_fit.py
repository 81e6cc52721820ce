"""Prompts that do not fit the generation model's context, found on the driver before any engine
starts: an evaluation of hours is not aborted by one long prompt. Each prompt is rendered the way
the engine renders it (the model's chat template, or the override, through its tokenizer); one
whose token count reaches ``max_model_len`` (default: the model's ``max_position_embeddings``)
leaves no room to generate. Such prompts are skipped and counted in the report, or refused.

Only the model's tokenizer and config files are read (a remote model's are copied to a temporary
folder); no weights move.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..storage import open_storage

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


def prompts_too_long(model_uri: str, texts: list[str], *, max_model_len: int | None, trust_remote_code: bool,
                     chat_template: str | None = None) -> dict[int, int]:
    """{index: token count} of the prompts that do not fit; empty when the context is unknown."""
    from .engine.vllm_engine import _load_tokenizer, _render

    with tempfile.TemporaryDirectory(prefix="expo-ray-tok-") as tmp:
        folder = model_uri if "://" not in model_uri else _copy_tokenizer(model_uri, Path(tmp))
        limit = max_model_len or _context_length(Path(folder) / "config.json")
        if not limit:
            return {}
        tok = _load_tokenizer(folder, trust_remote_code, "model", chat_template)
        counts = {i: len(_render(tok, [{"role": "user", "content": t}], True)) for i, t in enumerate(texts)}
    return {i: n for i, n in counts.items() if n >= limit}


def _context_length(config: Path) -> int | None:
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _copy_tokenizer(uri: str, dest: Path) -> str:
    store = open_storage(uri)
    for key in TOKENIZER_FILES:
        if store.exists(key):
            (dest / key).write_bytes(store.read_bytes(key, limit=256 * 1024 * 1024))
    return str(dest)
