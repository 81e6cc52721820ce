"""Commits a variant whose shards are written: index, side files, model card, then the manifest last.

A variant folder counts as finished only once its manifest exists, and the manifest is created
if absent, so two runs cannot both commit one folder. Every committed byte depends only on the
inputs and settings (never on how the command was spelled), so a concurrent run of the same job
writes the same bytes. Also here: the receipts of finished output shards are removed once their
variant is committed, and the informational index at the destination root is rewritten.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from .._version import __version__
from ..checkpoint import hashing
from ..checkpoint.folder import INDEX_FILE
from ..errors import AlreadyExists, ExpoError, StorageError
from ..extrapolation.plan import Plan, plan_summary
from ..extrapolation.shard_task import RECEIPTS, receipt_key
from ..lora.plan import LoraPlan
from ..storage import Storage, open_storage
from .manifest import FORMAT, file_record, find_variants, read_manifest, write_manifest
from .modelcard import MERGEKIT_FILE, canonical_command, mergekit_config, model_card

log = logging.getLogger("expo_ray")

ROOT_INDEX = "expo-ray-index.json"
COMMITTED_BY_OTHER = "already committed by another run"
MAX_CARD_BYTES = 4 * 1024 * 1024  # the aligned model's README.md, read for its licence


def same_job_committed(variant: Storage, fingerprint: str) -> bool:
    """Whether `variant` holds a manifest of the job with this fingerprint."""
    try:
        existing = read_manifest(variant)
    except ExpoError:
        return False
    return existing is not None and existing.get("fingerprint") == fingerprint


def commit_variant(plan: Plan, out: Storage, name: str, alpha: float, records: list[dict], fingerprint: str,
                   hashes: tuple[str, ...] = hashing.DEFAULT) -> str:
    """Index, config and tokenizer files, model card, then the manifest LAST (create-if-absent);
    returns "written" or COMMITTED_BY_OTHER. Every byte is fixed before anything is written."""
    outcome = _commit(plan, out, name, alpha, records, fingerprint, hashes)
    for r in records:  # the variant's manifest now vouches for its shards
        out.delete(receipt_key(name, r["shard"]))
    return outcome


def _commit(plan: Plan, out: Storage, name: str, alpha: float, records: list[dict], fingerprint: str,
            hashes: tuple[str, ...]) -> str:
    variant = out.child(name)
    # Attempts of tasks that were killed and retried may have left temp files / uploads behind.
    leftovers = out.cleanup_incomplete(name)
    if leftovers:
        log.info("%s: removed %d leftover(s) of killed task attempts", variant.describe(), leftovers)
    files = [{"path": r["shard"], **{k: v for k, v in r["files"][name].items() if k != "version"}} for r in records]
    summary = plan_summary(plan)
    if isinstance(plan, LoraPlan):  # the aligned model is a LoRA adapter: its own side files and card
        from .adapter_files import lora_manifest_fields, lora_payload

        payload = lora_payload(plan, alpha, _source_card(open_storage(plan.adapter_uri)))
        about = lora_manifest_fields(plan, alpha)
    else:
        index = {"metadata": {"total_size": plan.model_bytes}, "weight_map": plan.weight_map()}
        payload = {INDEX_FILE: (json.dumps(index, indent=2) + "\n").encode()}
        aligned = open_storage(plan.aligned_uri)
        for key in plan.aux_files:
            payload[key] = aligned.read_bytes(key, limit=512 * 1024 * 1024)
        payload["README.md"] = model_card(plan, alpha, _source_card(aligned)).encode()
        payload[MERGEKIT_FILE] = mergekit_config(plan, alpha).encode()
        about = {"command": canonical_command(plan.sft_uri, plan.aligned_uri, alpha, summary["rules"],
                                              summary["options"]),
                 "sources": {"sft": plan.sft_uri, "aligned": plan.aligned_uri, "fingerprint": plan.source_fingerprint}}
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
        **about,
        "rules": summary["rules"],
        "options": summary["options"],
        "tensors": dict(plan.counts),
        "bytes": sum(f["size"] for f in files),
        "files": files,
    }
    try:
        write_manifest(variant, manifest)
    except AlreadyExists:
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
