"""Prompt sets for evaluation: UltraFeedback test_gen, AlpacaEval 2.0, or any JSON/JSONL/Parquet file.

Files come from local paths, s3:// or the Hugging Face Hub (dataset files through huggingface_hub;
HF_HUB_OFFLINE=1 works from a populated cache). Each prompt is a single user turn.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass

from ..errors import ExpoError
from ..options import PromptOptions
from ..storage import open_storage

# Well-known sets: (hub dataset repo, file in it, how to read a prompt).
KNOWN_SETS = {
    # The paper's 1,000 prompts: first user turn of `messages`.
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "data/test_gen-00000-of-00001.parquet", "messages"),
    # AlpacaEval 2.0: 805 `instruction`s (with the `dataset` each came from).
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "alpaca_eval.json", "instruction"),
}
PROMPT_FIELDS = ("prompt", "instruction", "question", "messages")
MAX_FILE_BYTES = 2 * 1024 ** 3


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    dataset: str = ""   # AlpacaEval's per-prompt `dataset` field, when the source has one


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: str
    prompts: tuple[Prompt, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(json.dumps([p.id, p.text]).encode())
        return h.hexdigest()


def _first_user_turn(messages) -> str | None:
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    return None


def _rows(data: bytes, name: str, label: str) -> list[dict]:
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(io.BytesIO(data)).to_pylist()
        text = data.decode("utf-8")
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExpoError(f"{label}: cannot parse ({exc})") from None
    except ImportError:
        raise ExpoError(f"{label}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    if isinstance(value, dict):
        for key in ("data", "rows", "examples"):
            if isinstance(value.get(key), list):
                return value[key]
    if not isinstance(value, list):
        raise ExpoError(f"{label}: expected a list of records")
    return value


def _read_file(uri: str) -> tuple[bytes, str]:
    """(content, file name) for a local path, s3://bucket/key or hf://datasets/org/name/path[@rev]."""
    if uri.startswith("hf://datasets/"):
        rest = uri[len("hf://datasets/"):]
        rest, _, revision = rest.partition("@")
        parts = rest.split("/")
        if len(parts) < 3:
            raise ExpoError(f"{uri}: expected hf://datasets/org/name/path/to/file[@revision]")
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]), revision or None), parts[-1]
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_storage(parent or ".")
    return store.read_bytes(name, limit=MAX_FILE_BYTES), name


def _hub_file(repo: str, filename: str, revision: str | None) -> bytes:
    from huggingface_hub import hf_hub_download

    from ..storage.hub import cache_dir, offline

    try:
        path = hf_hub_download(repo, filename, repo_type="dataset", revision=revision, cache_dir=cache_dir(),
                               local_files_only=offline())
    except Exception as exc:  # noqa: BLE001 - one message for the many hub errors
        raise ExpoError(f"hf://datasets/{repo}/{filename}: cannot fetch ({type(exc).__name__}: {exc})") from None
    with open(path, "rb") as f:
        return f.read()


def prompts_from_options(options: PromptOptions) -> PromptSet:
    """The prompt set ``options`` (a command's or a sweep spec's prompt options) name."""
    return load_prompts(options.set, field=options.field, limit=options.limit, sample=options.sample,
                        seed=options.sample_seed)


def load_prompts(spec: str, *, field: str | None = None, limit: int | None = None,
                 sample: int | None = None, seed: int = 0) -> PromptSet:
    """A prompt set by name (ultrafeedback, alpaca_eval) or file URI; optionally the first `limit`
    prompts or a seeded random `sample` of them."""
    if spec in KNOWN_SETS:
        repo, filename, default_field = KNOWN_SETS[spec]
        uri = f"hf://datasets/{repo}/{filename}"
        data, name = _hub_file(repo, filename, None), filename
        field = field or default_field
        set_name = spec
    else:
        uri = spec
        data, name = _read_file(spec)
        set_name = os.path.splitext(name)[0]
    rows = _rows(data, name, uri)
    if not rows:
        raise ExpoError(f"{uri}: the prompt set is empty")
    fields = [field] if field else [f for f in PROMPT_FIELDS if isinstance(rows[0], dict) and f in rows[0]]
    if not fields or not isinstance(rows[0], dict) or fields[0] not in rows[0]:
        seen = sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
        raise ExpoError(f"{uri}: no prompt field {'(' + field + ')' if field else ''} in the records "
                        f"(looked for {', '.join([field] if field else PROMPT_FIELDS)}; records have {seen}); "
                        "use --prompt-field")
    key = fields[0]
    prompts = []
    for i, row in enumerate(rows):
        value = row.get(key) if isinstance(row, dict) else None
        text = _first_user_turn(value) if key == "messages" else value
        if not isinstance(text, str) or not text.strip():
            raise ExpoError(f"{uri}: record {i} has no usable {key!r} (empty or not text)")
        pid = str(row.get("prompt_id") or row.get("id") or i)
        prompts.append(Prompt(pid, text, str(row.get("dataset", "")) if isinstance(row, dict) else ""))
    if len({p.id for p in prompts}) != len(prompts):
        prompts = [Prompt(str(i), p.text, p.dataset) for i, p in enumerate(prompts)]
    if sample is not None and sample < len(prompts):
        # The sampled prompts keep their order in the file (whatever their ids look like).
        prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), sample))]
        set_name += f"-sample{sample}-seed{seed}"
    if limit is not None:
        prompts = prompts[:limit]
        set_name += f"-first{limit}"
    if not prompts:
        raise ExpoError(f"{uri}: no prompts left after --limit/--sample")
    return PromptSet(set_name, uri, tuple(prompts))
