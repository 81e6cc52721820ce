"""Every identity expo-ray computes: the fingerprints that say "same work, skip it" and the cache keys.

What each one names, and what changes it:

- `checkpoint_fingerprint`, one checkpoint: a shard header (names, dtypes, shapes, offsets), a file
  size, or the content version (size and mtime, ETag, Hub commit) of a shard, config, tokenizer,
  template or README.md.
- `sources_fingerprint`, a model pair (manifest `sources.fingerprint`): either checkpoint's fingerprint.
- `variant_fingerprint`, one variant (manifest `fingerprint`): the sources, alpha, the alpha rules
  (scales, layer scales, exclusions) or the plan options.
- `checkpoint_identity`, a model evaluated without a manifest (alpha 0, the SFT model, a reward
  model): its fingerprint, or the Hub repository and commit.
- `evaluation_id`, an evaluation's default output folder: the prompts, sampling or reward model.
- `generation_key`, one model's cached answers: the model's identity, the prompts, sampling, the
  context length, `SEEDING`, the chat template.
- `reward_key`, one model's cached rewards: its generation key or the reward model.
- `pair_id`, a sweep pair's folder: the pair's inputs or alpha rules (not its name).

Each is a sha256 of canonical JSON, so the same inputs give the same id on every machine.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

from ..options import PlanOptions, format_alpha
from .folder import Checkpoint

SEEDING = "seed-per-prompt"  # part of every generation key: how sampling seeds are drawn


def _sha256(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_fingerprint(ckpt: Checkpoint) -> str:
    """Identifies a checkpoint by its headers (names, dtypes, shapes, offsets, file sizes) and the
    content version (size and mtime, ETag, Hub commit) of each shard and of each config, tokenizer
    and template file: two fine-tunes of one architecture have identical headers, and an edited
    config or chat template is another model."""
    shards = list(ckpt.headers)
    side = ckpt.side_files()  # README.md too: the variants' cards carry over its licence
    files = shards + side
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        versions = dict(zip(files, pool.map(ckpt.storage.version, files)))
    h = hashlib.sha256()
    for shard, header in ckpt.headers.items():
        h.update(
            json.dumps(
                [
                    shard,
                    header.file_size,
                    versions[shard],
                    [[t.name, t.dtype, list(t.shape), t.start] for t in header.tensors],
                ]
            ).encode()
        )
    for key in side:
        h.update(json.dumps([key, versions[key]]).encode())
    return h.hexdigest()


def sources_fingerprint(sft: Checkpoint, aligned: Checkpoint) -> str:
    """The model pair a plan extrapolates."""
    return hashlib.sha256((checkpoint_fingerprint(sft) + checkpoint_fingerprint(aligned)).encode()).hexdigest()


def variant_fingerprint(plan, alpha: float) -> str:
    """Same inputs, alpha, rules and options -> same id; used to skip finished work (``plan``: an
    :class:`expo_ray.extrapolation.plan.Plan`, which this lower layer does not import)."""

    ident = json.dumps(
        [plan.source_fingerprint, format_alpha(alpha), plan.rules.describe(), sorted(plan.options.policies().items())]
    )
    return hashlib.sha256(ident.encode()).hexdigest()


def checkpoint_identity(uri: str) -> str:
    """Identity of a source checkpoint from its headers and files (no tensor reads)."""
    ckpt = Checkpoint.open(uri, require_config=False)
    prefix = ckpt.uri if ckpt.uri.startswith("hf://") else ""  # a hub commit names the weights too
    return hashlib.sha256((prefix + checkpoint_fingerprint(ckpt)).encode()).hexdigest()


def evaluation_id(prompts_fingerprint: str, sampling: dict, reward_identity: str) -> str:
    """The short id in an evaluation's default output folder."""
    return _sha256([prompts_fingerprint, sampling, reward_identity])[:12]


def generation_key(
    model_identity: str, prompts_fingerprint: str, sampling: dict, max_model_len: int | None, chat_template: str | None
) -> str:
    """The cache key of one model's answers to a prompt set."""
    template = [chat_template] if chat_template else []  # absent: caches made before templates stay valid
    return _sha256([model_identity, prompts_fingerprint, sampling, max_model_len, SEEDING, *template])


def reward_key(generation: str, reward_identity: str) -> str:
    """The cache key of the rewards of one model's answers."""
    return _sha256([generation, reward_identity])


def pair_id(sft: str, aligned: str, plan: PlanOptions) -> str:
    """A sweep pair's id, from its inputs and settings (not from its name)."""
    parts = [sft, aligned, list(plan.scales), plan.layer_scales, list(plan.exclude), plan.copy_unmatched,
             plan.allow_added_rows]
    if plan.allow_nonfinite:  # absent when off: ids of pairs made before the option stay the same
        parts.append({"allow_nonfinite": True})
    if plan.merge is not None:  # the form of an adapter pair's variants (absent: as before)
        parts.append({"merge": plan.merge})
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
