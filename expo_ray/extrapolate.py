"""Executes a plan on Ray: one task per aligned shard, then commits each variant, manifest last."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import __version__
from .checkpoint import INDEX_FILE
from .errors import ExpoError
from .manifest import FORMAT, file_record, read_manifest, write_manifest
from .modelcard import model_card
from .plan import Plan, format_alpha, plan_summary, variant_name
from .ray_runtime import ProgressBar, ensure_ray
from .shard_task import ShardJob, run_shard
from .storage import Storage, open_storage

log = logging.getLogger("expo_ray")

DEFAULT_CHUNK_MIB = 256
# Memory Ray reserves per task beyond the chunk buffers (interpreter, libraries, readers).
TASK_BASE_MEMORY = 512 * 1024 * 1024
TASK_MAX_RETRIES = 3


@dataclass
class ExtrapolationResult:
    out_uri: str
    variants: dict[str, str] = field(default_factory=dict)   # variant -> "written" | "already complete"
    seconds: float = 0.0
    bytes_written: int = 0
    bytes_read: int = 0


def variant_fingerprint(plan: Plan, alpha: float) -> str:
    """Same inputs, alpha, rules and options -> same id; used to skip finished variants."""
    ident = json.dumps([plan.source_fingerprint, format_alpha(alpha), plan.rules.describe(),
                        sorted(plan_summary(plan)["options"].items())])
    return hashlib.sha256(ident.encode()).hexdigest()


def _shard_task(job: ShardJob, tracker):
    progress = (lambda n: tracker.add.remote(n)) if tracker is not None else None
    return run_shard(job, progress)


def run_plan(plan: Plan, out_uri: str, *, chunk_mib: float = DEFAULT_CHUNK_MIB, address: str | None = None,
             command: str | None = None, show_progress: bool = True) -> ExtrapolationResult:
    """Write every variant of `plan` under `out_uri`, skipping variants already committed."""
    began = time.perf_counter()
    out = open_storage(out_uri)
    result = ExtrapolationResult(out.uri)
    todo = []
    for alpha in plan.alphas:
        name = variant_name(alpha)
        manifest = read_manifest(out.child(name))
        if manifest is None:
            todo.append(alpha)
        elif manifest.get("fingerprint") == variant_fingerprint(plan, alpha):
            result.variants[name] = "already complete"
            log.info("%s: already complete (manifest present), skipped", out.describe(name))
        else:
            raise ExpoError(f"{out.describe(name)}: holds a committed variant made from other inputs or settings; "
                            "choose another --out or remove it")
    if not todo:
        return result

    ray = ensure_ray(address)
    chunk_bytes = int(chunk_mib * 1024 * 1024)
    names = tuple(variant_name(a) for a in todo)
    aligned_store = open_storage(plan.aligned_uri)
    jobs = [ShardJob(shard, plan.sft_uri, plan.aligned_uri, out.uri, tuple(todo), names,
                     _shard_metadata(aligned_store, shard.key), chunk_bytes)
            for shard in plan.shards]
    total = sum(s.nbytes for s in plan.shards)
    log.info("extrapolating %d shard(s), %.2f GB per variant, %d variant(s): %s",
             len(jobs), total / 1e9, len(todo), ", ".join(names))
    with ProgressBar(ray, total, "extrapolate", enabled=show_progress) as bar:
        task = ray.remote(_shard_task)
        refs = {task.options(name=f"extrapolate:{j.shard.key}", memory=TASK_BASE_MEMORY + chunk_bytes,
                             max_retries=TASK_MAX_RETRIES, retry_exceptions=False).remote(j, bar.tracker): j
                for j in jobs}
        records = bar.wait(refs)

    for alpha, name in zip(todo, names):
        _commit_variant(plan, out.child(name), alpha, records, command, variant_fingerprint(plan, alpha))
        result.variants[name] = "written"
    result.bytes_written = sum(f["size"] for r in records for f in r["files"].values())
    result.bytes_read = sum(r["bytes_read"] for r in records)
    result.seconds = time.perf_counter() - began
    return result


def _shard_metadata(store: Storage, key: str) -> dict:
    from .safetensors_io import read_header

    meta = dict(read_header(store, key).metadata)
    return {k: v for k, v in meta.items() if not k.startswith("expo_ray.")}


def _commit_variant(plan: Plan, variant: Storage, alpha: float, records: list[dict], command: str | None,
                    fingerprint: str) -> None:
    """Index, config and tokenizer files, model card, then the manifest LAST."""
    name = variant_name(alpha)
    files = [{"path": r["shard"], **r["files"][name]} for r in records]
    index = {"metadata": {"total_size": plan.model_bytes}, "weight_map": plan.weight_map()}
    index_bytes = (json.dumps(index, indent=2) + "\n").encode()
    variant.write_bytes(INDEX_FILE, index_bytes)
    files.append(file_record(variant, INDEX_FILE, index_bytes))
    aligned = open_storage(plan.aligned_uri)
    for key in plan.aux_files:
        data = aligned.read_bytes(key, limit=512 * 1024 * 1024)
        variant.write_bytes(key, data)
        files.append(file_record(variant, key, data))
    card = model_card(plan, alpha, command).encode()
    variant.write_bytes("README.md", card)
    files.append(file_record(variant, "README.md", card))
    manifest = {
        "format": FORMAT,
        "variant": name,
        "alpha": alpha,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "expo_ray_version": __version__,
        "command": command,
        "sources": {"sft": plan.sft_uri, "aligned": plan.aligned_uri, "fingerprint": plan.source_fingerprint},
        "rules": plan.rules.describe(),
        "options": plan_summary(plan)["options"],
        "tensors": dict(plan.counts),
        "files": files,
    }
    write_manifest(variant, manifest)
    log.info("committed %s", variant.describe())


def default_command() -> str:
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])
