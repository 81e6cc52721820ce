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
import os
import time
from datetime import datetime, timezone

from .._version import __version__
from ..checkpoint import hashing
from ..checkpoint.folder import INDEX_FILE
from ..errors import AlreadyExists, ExpoError, SourceChanged, StorageError
from ..extrapolation.plan import Plan, plan_summary
from ..extrapolation.shard_task import RECEIPTS
from ..lora.plan import LoraPlan
from ..storage import Source, Storage
from .lease import Lease, LeaseLost, remove_own, settle_folder
from .manifest import FORMAT, file_record, find_variants, read_manifest, write_manifest
from .modelcard import MERGEKIT_FILE, canonical_command, mergekit_config, model_card

log = logging.getLogger("expo_ray")

ROOT_INDEX = "expo-ray-index.json"
COMMITTED_BY_OTHER = "already committed by another run"
MAX_CARD_BYTES = 4 * 1024 * 1024  # the aligned model's README.md, read for its licence
# Fault-injection knob for tests of runs killed mid-commit: sleep this many seconds between the
# side files and the manifest.
COMMIT_DELAY_S = float(os.environ.get("EXPO_RAY_COMMIT_DELAY_S", "0") or 0)


def same_job_committed(variant: Storage, fingerprint: str) -> bool:
    """Whether `variant` holds a manifest of the job with this fingerprint."""
    try:
        existing = read_manifest(variant)
    except ExpoError:
        return False
    return existing is not None and existing.get("fingerprint") == fingerprint


def owned_files(plan: Plan) -> list[str]:
    """Every file a committed variant of `plan` holds besides its manifest."""
    if isinstance(plan, LoraPlan):
        from .adapter_files import lora_file_names

        return [s.key for s in plan.shards] + lora_file_names(plan)
    return [s.key for s in plan.shards] + [INDEX_FILE, *plan.aux_files, "README.md", MERGEKIT_FILE]


def commit_variant(plan: Plan, out: Storage, name: str, alpha: float, records: list[dict], fingerprint: str,
                   hashes: tuple[str, ...] = hashing.DEFAULT, lease: Lease | None = None) -> str:
    """Index, config and tokenizer files, model card, then the manifest LAST (create-if-absent);
    returns "written" or COMMITTED_BY_OTHER. Every byte is fixed before anything is written: the
    side files are read at the versions the plan pinned, and the folder is made to hold exactly
    the manifest's files (leftovers of expo-ray runs removed, anything else refused) while this
    run holds its lease."""
    outcome = _commit(plan, out, name, alpha, records, fingerprint, hashes, lease)
    for key in out.list(f"{RECEIPTS}/{name}"):  # the variant's manifest now vouches for its shards
        out.delete(key)
    return outcome


def _commit(plan: Plan, out: Storage, name: str, alpha: float, records: list[dict], fingerprint: str,
            hashes: tuple[str, ...], lease: Lease | None) -> str:
    variant = out.child(name)
    files = [{"path": r["shard"], **{k: v for k, v in r["files"][name].items() if k != "version"}} for r in records]
    summary = plan_summary(plan)
    if isinstance(plan, LoraPlan):  # the aligned model is a LoRA adapter: its own side files and card
        from .adapter_files import lora_manifest_fields, lora_payload

        payload = lora_payload(plan, alpha, _source_card(plan.sources["adapter"]))
        about = lora_manifest_fields(plan, alpha)
    else:
        index = {"metadata": {"total_size": plan.model_bytes}, "weight_map": plan.weight_map()}
        payload = {INDEX_FILE: (json.dumps(index, indent=2) + "\n").encode()}
        aligned = plan.sources["aligned"]
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
        try:
            return _committed_by_other(variant, existing, fingerprint, files)
        except ExpoError:
            if lease is not None:  # another job's variant: what this run wrote there goes
                remove_own(out, name, records, keep={r.get("path") for r in existing["files"]})
            raise
    if lease is not None:
        try:
            lease.confirm()
        except LeaseLost:
            remove_own(out, name, records)
            raise
        settle_folder(out, lease)
    else:  # attempts of tasks that were killed and retried may have left temp files / uploads behind
        out.cleanup_incomplete(name)
    for r in records:
        _check_unchanged(variant, r["shard"], r["files"][name])
    for key, data in payload.items():
        variant.write_bytes(key, data)
    if COMMIT_DELAY_S:
        time.sleep(COMMIT_DELAY_S)
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


def _source_card(aligned: Source) -> str:
    """The aligned model's README.md (its licence goes into the variants' cards), or ''."""
    try:
        if "README.md" in aligned.pins:  # pinned by the plan when the model has one
            return aligned.read_bytes("README.md", limit=MAX_CARD_BYTES).decode("utf-8", "replace")
    except SourceChanged:
        raise
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
