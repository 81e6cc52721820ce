"""Executes a plan on Ray: one task per aligned shard, then commits each variant, manifest last.

Re-running the same job is safe and cheap: committed variants are skipped, output shards an
interrupted run finished are re-verified and kept, leftovers of interrupted writes are removed,
and the outputs are byte-identical to an uninterrupted run.
"""
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
from .errors import ExpoError, StorageError
from .manifest import FORMAT, file_record, find_variants, read_manifest, write_manifest
from .modelcard import model_card
from .plan import Plan, format_alpha, plan_summary, variant_name
from .ray_runtime import ProgressBar, ensure_ray, task_options
from .safetensors_io import read_header
from .shard_task import RECEIPTS, ShardJob, receipt_key, run_shard
from .storage import Storage, open_storage

log = logging.getLogger("expo_ray")

DEFAULT_CHUNK_MIB = 256
# Memory Ray reserves per task beyond the chunk and upload buffers (interpreter, libraries).
TASK_BASE_MEMORY = 512 * 1024 * 1024
TASK_MAX_RETRIES = 3
ROOT_INDEX = "expo-ray-index.json"


@dataclass
class ExtrapolationResult:
    out_uri: str
    variants: dict[str, str] = field(default_factory=dict)   # variant -> "written" | "already complete"
    seconds: float = 0.0
    bytes_written: int = 0
    bytes_read: int = 0
    shards_resumed: int = 0


def variant_fingerprint(plan: Plan, alpha: float) -> str:
    """Same inputs, alpha, rules and options -> same id; used to skip finished work."""
    ident = json.dumps([plan.source_fingerprint, format_alpha(alpha), plan.rules.describe(),
                        sorted(plan_summary(plan)["options"].items())])
    return hashlib.sha256(ident.encode()).hexdigest()


def _shard_task(job: ShardJob, tracker):
    progress = (lambda n: tracker.add.remote(n)) if tracker is not None else None
    return run_shard(job, progress)


def run_plan(plan: Plan, out_uri: str, *, chunk_mib: float = DEFAULT_CHUNK_MIB, address: str | None = None,
             command: str | None = None, show_progress: bool = True) -> ExtrapolationResult:
    """Write every variant of `plan` under `out_uri`, skipping work already done."""
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
        write_root_index(out)
        return result

    names = tuple(variant_name(a) for a in todo)
    fingerprints = tuple(variant_fingerprint(plan, a) for a in todo)
    cleaned = sum(out.cleanup_incomplete(n) for n in names)
    if cleaned:
        log.info("removed %d incomplete upload(s)/file(s) left by an interrupted run", cleaned)

    ray = ensure_ray(address)
    chunk_bytes = int(chunk_mib * 1024 * 1024)
    memory = TASK_BASE_MEMORY + chunk_bytes + len(todo) * out.write_buffer_bytes
    from .capacity import cluster_capacity  # a task no node can hold would wait forever: refuse now

    cluster_capacity(ray).check({"CPU": 1, "memory": memory}, f"an extrapolation task (--chunk-mib {chunk_mib:g})")
    aligned_store = open_storage(plan.aligned_uri)
    jobs = [ShardJob(shard, plan.sft_uri, plan.aligned_uri, out.uri, tuple(todo), names, fingerprints,
                     _shard_metadata(aligned_store, shard.key), chunk_bytes)
            for shard in plan.shards]
    total = sum(s.nbytes for s in plan.shards)
    log.info("extrapolating %d shard(s), %.2f GB per variant, %d variant(s): %s",
             len(jobs), total / 1e9, len(todo), ", ".join(names))
    with ProgressBar(ray, total, "extrapolate", enabled=show_progress) as bar:
        task = ray.remote(_shard_task)
        refs = {task.options(**task_options(name=f"extrapolate:{j.shard.key}", memory=memory,
                                            max_retries=TASK_MAX_RETRIES, retry_exceptions=False)).remote(j, bar.tracker): j
                for j in jobs}
        records = bar.wait(refs)
    result.shards_resumed = sum(len(r["resumed"]) for r in records)
    if result.shards_resumed:
        log.info("resumed: %d output shard(s) were already written by an earlier run and verified",
                 result.shards_resumed)

    for alpha, name, fingerprint in zip(todo, names, fingerprints):
        result.variants[name] = _commit_variant(plan, out, name, alpha, records, command, fingerprint)
        for r in records:
            out.delete(receipt_key(name, r["shard"]))
    write_root_index(out)
    result.bytes_written = sum(r["files"][n]["size"] for r in records for n in names if n not in r["resumed"])
    result.bytes_read = sum(r["bytes_read"] for r in records)
    result.seconds = time.perf_counter() - began
    return result


def _shard_metadata(store: Storage, key: str) -> dict:
    meta = dict(read_header(store, key).metadata)
    return {k: v for k, v in meta.items() if not k.startswith("expo_ray.")}


def _commit_variant(plan: Plan, out: Storage, name: str, alpha: float, records: list[dict], command: str | None,
                    fingerprint: str) -> str:
    """Index, config and tokenizer files, model card, then the manifest LAST (create-if-absent)."""
    variant = out.child(name)
    # Attempts of tasks that were killed and retried may have left temp files / uploads behind.
    leftovers = out.cleanup_incomplete(name)
    if leftovers:
        log.info("%s: removed %d leftover(s) of killed task attempts", variant.describe(), leftovers)
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
        "bytes": sum(f["size"] for f in files),
        "files": files,
    }
    try:
        write_manifest(variant, manifest)
    except StorageError:
        existing = read_manifest(variant)
        if existing is not None and existing.get("fingerprint") == fingerprint:
            log.info("%s: committed meanwhile by a concurrent run with the same inputs", variant.describe())
            return "already complete"
        raise
    log.info("committed %s", variant.describe())
    return "written"


def write_root_index(out: Storage) -> None:
    """`expo-ray-index.json` at the destination root: every variant and its state (informational;
    a variant's own manifest is the truth)."""
    entries = []
    for folder in find_variants(out):
        if not folder or folder.startswith(RECEIPTS.split("/")[0]):
            continue
        try:
            manifest = read_manifest(out.child(folder))
        except ExpoError:
            manifest = None
        entries.append({
            "variant": folder,
            "state": "committed" if manifest else "incomplete",
            "alpha": manifest.get("alpha") if manifest else None,
            "sources": manifest.get("sources") if manifest else None,
            "bytes": manifest.get("bytes") if manifest else None,
            "created": manifest.get("created") if manifest else None,
        })
    index = {"format": "expo-ray.index/1", "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "variants": entries}
    out.write_bytes(ROOT_INDEX, (json.dumps(index, indent=2) + "\n").encode())


def default_command() -> str:
    import shlex
    import sys

    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])
