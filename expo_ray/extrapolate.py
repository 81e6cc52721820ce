"""Executes a plan on Ray: one task per aligned shard, then commits each variant, manifest last.

Re-running the same job is safe and cheap: committed variants are skipped, output shards an
interrupted run finished are re-verified and kept, leftovers of interrupted writes are removed,
and the outputs are byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import CallableModule, __version__, hashing, pieces
from .checkpoint import INDEX_FILE
from .destination import check_destination
from .errors import ExpoError, StorageError
from .manifest import FORMAT, file_record, find_variants, read_manifest, write_manifest
from .modelcard import MERGEKIT_FILE, canonical_command, mergekit_config, model_card
from .plan import Plan, format_alpha, plan_summary, variant_name
from .ray_runtime import ProgressBar, ensure_ray, task_options
from .safetensors_io import read_header
from .shard_task import RECEIPTS, ShardJob, receipt_key, run_piece, run_shard
from .storage import Storage, open_storage

log = logging.getLogger("expo_ray")

DEFAULT_CHUNK_MIB = 256
# Memory Ray reserves per task beyond the chunk and upload buffers (interpreter, libraries).
TASK_BASE_MEMORY = 512 * 1024 * 1024
TASK_MAX_RETRIES = 3
ROOT_INDEX = "expo-ray-index.json"
COMMITTED_BY_OTHER = "already committed by another run"
MAX_CARD_BYTES = 4 * 1024 * 1024  # the aligned model's README.md, read for its licence


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
    return run_piece(job, progress) if job.file_range else run_shard(job, progress)


def run_plan(plan: Plan, out_uri: str, *, chunk_mib: float = DEFAULT_CHUNK_MIB, address: str | None = None,
             show_progress: bool = True, sha256: bool = False) -> ExtrapolationResult:
    """Write every variant of `plan` under `out_uri`, skipping work already done. Every file is
    recorded with its BLAKE3 hash, and also its sha256 (as Hub LFS pointers hold) if `sha256`."""
    began = time.perf_counter()
    out = check_destination(out_uri, {"sft": plan.sft_uri, "aligned": plan.aligned_uri})
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
    hashes = hashing.algorithms(sha256)
    jobs = [ShardJob(shard, plan.sft_uri, plan.aligned_uri, out.uri, tuple(todo), names, fingerprints,
                     _shard_metadata(aligned_store, shard.key), chunk_bytes, plan.options.allow_nonfinite, hashes)
            for shard in plan.shards]
    total = sum(s.nbytes for s in plan.shards)
    log.info("extrapolating %d shard(s), %.2f GB per variant, %d variant(s): %s",
             len(jobs), total / 1e9, len(todo), ", ".join(names))
    with ProgressBar(ray, total, "extrapolate", enabled=show_progress) as bar:
        task = ray.remote(_shard_task)

        def submit(batch: list[ShardJob]) -> list[dict]:
            refs = {task.options(**task_options(name=_task_name(j), memory=memory, max_retries=TASK_MAX_RETRIES,
                                                retry_exceptions=False)).remote(j, bar.tracker): j
                    for j in batch}
            return bar.wait(refs)

        try:
            if pieces.usable(out, hashes):  # byte ranges of the outputs, as many as the CPUs can use
                records = pieces.run(jobs, out, int(ray.cluster_resources().get("CPU", 1)), submit)
            else:  # one task per shard, each output streamed in order
                records = submit(jobs)
        except ExpoError:
            # Another run of the same job may have committed these variants meanwhile (and removed
            # what this run was writing): that is success, not failure.
            if not all(_same_job_committed(out.child(n), f) for n, f in zip(names, fingerprints)):
                raise
            result.variants.update({n: COMMITTED_BY_OTHER for n in names})
            write_root_index(out)
            return result
    result.shards_resumed = sum(len(r["resumed"]) for r in records)
    if result.shards_resumed:
        log.info("resumed: %d output shard(s) were already written by an earlier run and verified",
                 result.shards_resumed)

    for alpha, name, fingerprint in zip(todo, names, fingerprints):
        result.variants[name] = _commit_variant(plan, out, name, alpha, records, fingerprint, hashes)
        for r in records:
            out.delete(receipt_key(name, r["shard"]))
    write_root_index(out)
    result.bytes_written = sum(r["files"][n]["size"] for r in records for n in names if n not in r["resumed"])
    result.bytes_read = sum(r["bytes_read"] for r in records)
    result.seconds = time.perf_counter() - began
    return result


def _task_name(job: ShardJob) -> str:
    where = f"[{job.file_range[0]}:{job.file_range[1]}]" if job.file_range else ""
    return f"extrapolate:{job.shard.key}{where}"


def _shard_metadata(store: Storage, key: str) -> dict:
    meta = dict(read_header(store, key).metadata)
    return {k: v for k, v in meta.items() if not k.startswith("expo_ray.")}


def _same_job_committed(variant: Storage, fingerprint: str) -> bool:
    try:
        existing = read_manifest(variant)
    except ExpoError:
        return False
    return existing is not None and existing.get("fingerprint") == fingerprint


def _commit_variant(plan: Plan, out: Storage, name: str, alpha: float, records: list[dict], fingerprint: str,
                    hashes: tuple[str, ...] = hashing.DEFAULT) -> str:
    """Index, config and tokenizer files, model card, then the manifest LAST (create-if-absent).

    Every byte is fixed before anything is written, and depends only on the inputs and settings
    (never on how the command was spelled): a concurrent run of the same job writes the same bytes."""
    variant = out.child(name)
    # Attempts of tasks that were killed and retried may have left temp files / uploads behind.
    leftovers = out.cleanup_incomplete(name)
    if leftovers:
        log.info("%s: removed %d leftover(s) of killed task attempts", variant.describe(), leftovers)
    files = [{"path": r["shard"], **{k: v for k, v in r["files"][name].items() if k != "version"}} for r in records]
    index = {"metadata": {"total_size": plan.model_bytes}, "weight_map": plan.weight_map()}
    payload = {INDEX_FILE: (json.dumps(index, indent=2) + "\n").encode()}
    aligned = open_storage(plan.aligned_uri)
    for key in plan.aux_files:
        payload[key] = aligned.read_bytes(key, limit=512 * 1024 * 1024)
    summary = plan_summary(plan)
    payload["README.md"] = model_card(plan, alpha, _source_card(aligned)).encode()
    payload[MERGEKIT_FILE] = mergekit_config(plan, alpha).encode()
    files += [file_record(variant, key, data, hashes) for key, data in payload.items()]
    existing = read_manifest(variant)
    if existing is not None:  # a committed variant is immutable
        return _committed_by_other(variant, existing, fingerprint, files)
    for r in records:
        _check_unchanged(variant, r["shard"], r["files"][name])
    for key, data in payload.items():
        variant.write_bytes(key, data)
    manifest = {
        "format": FORMAT,
        "variant": name,
        "alpha": alpha,
        "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "expo_ray_version": __version__,
        "command": canonical_command(plan.sft_uri, plan.aligned_uri, alpha, summary["rules"], summary["options"]),
        "sources": {"sft": plan.sft_uri, "aligned": plan.aligned_uri, "fingerprint": plan.source_fingerprint},
        "rules": summary["rules"],
        "options": summary["options"],
        "tensors": dict(plan.counts),
        "bytes": sum(f["size"] for f in files),
        "files": files,
    }
    try:
        write_manifest(variant, manifest)
    except StorageError:
        existing = read_manifest(variant)
        if existing is None:
            raise
        return _committed_by_other(variant, existing, fingerprint, files)
    log.info("committed %s", variant.describe())
    return "written"


def _check_unchanged(variant: Storage, key: str, record: dict) -> None:
    """Refuse to commit a shard that is no longer the file this run wrote (a concurrent run into
    the same destination replaced it): a manifest must describe what is on storage."""
    if record.get("version") is not None and variant.version(key) == record["version"]:
        return
    # Replaced, or the version is unknown: identical bytes are fine.
    size, digests = hashing.digest_file(variant, key, hashing.recorded(record))
    if size != record["size"] or hashing.mismatches(record, digests):
        raise ExpoError(f"{variant.describe(key)}: replaced by another run writing into the same destination; "
                        "nothing was committed; run one job per destination, then re-run")


def _committed_by_other(variant: Storage, existing: dict, fingerprint: str, files: list[dict]) -> str:
    """The outcome when another run committed `variant` first: fine if it holds exactly our bytes."""
    def content(records):
        return sorted((r.get("path"), r.get("size"), *(r.get(n) for n in hashing.ALGORITHMS))
                      for r in records if isinstance(r, dict))
    if existing.get("fingerprint") == fingerprint and content(existing["files"]) == content(files):
        log.info("%s: already committed by another run with the same inputs and settings", variant.describe())
        return COMMITTED_BY_OTHER
    raise ExpoError(f"{variant.describe()}: committed meanwhile by another run with other inputs or settings "
                    "(its manifest differs); nothing of this run was committed there; choose another --out")
def _source_card(aligned: Storage) -> str:
    """The aligned model's README.md (its licence goes into the variants' cards), or ''."""
    try:
        if aligned.exists("README.md"):
            return aligned.read_bytes("README.md", limit=MAX_CARD_BYTES).decode("utf-8", "replace")
    except StorageError as exc:
        log.warning("%s: not read (%s); the variant's card names no licence", aligned.describe("README.md"), exc)
    return ""


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


# Called, `expo_ray.extrapolate(sft, aligned, alphas, out, ...)` runs expo_ray.api.extrapolate.
sys.modules[__name__].__class__ = CallableModule
