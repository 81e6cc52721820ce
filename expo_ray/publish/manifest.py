"""What a finished variant is: its files with sizes and content hashes, sources, alpha; written LAST.

A variant folder without manifest.json is incomplete, whatever else it holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..checkpoint import hashing
from ..checkpoint.folder import INDEX_FILE, MANIFEST_FILE
from ..checkpoint.safetensors_io import read_header
from ..errors import ExpoError, InvalidCheckpoint, StorageError
from ..storage import Storage, clean_key

FORMAT = "expo-ray.variant/1"


def file_record(storage: Storage, key: str, data: bytes | None = None,
                algorithms: tuple[str, ...] = hashing.DEFAULT) -> dict:
    if data is not None:
        return {"path": key, "size": len(data), **hashing.digest_bytes(data, algorithms)}
    size, digests = hashing.digest_file(storage, key, algorithms)
    return {"path": key, "size": size, **digests}


def _content_problem(variant: Storage, key: str, record: dict) -> str | None:
    """Why a file's content does not match its record (every digest it holds), or None."""
    names = hashing.recorded(record)
    if not names:
        return (f"{variant.describe(MANIFEST_FILE)}: the entry for {key} records no content hash "
                f"({', '.join(hashing.ALGORITHMS)})")
    _, digests = hashing.digest_file(variant, key, names)
    for name in hashing.mismatches(record, digests):
        return (f"{variant.describe(key)}: {name} {digests[name][:16]}... differs from the manifest's "
                f"{record[name][:16]}...")
    return None


def write_manifest(variant: Storage, manifest: dict) -> None:
    """Create the manifest; fails (AlreadyExists) if one exists, so two runs cannot both commit."""
    variant.write_bytes(MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode(), if_absent=True)


def read_manifest(variant: Storage) -> dict | None:
    """The manifest, or None if the variant was never committed."""
    if not variant.exists(MANIFEST_FILE):
        return None
    try:
        manifest = json.loads(variant.read_bytes(MANIFEST_FILE, limit=64 * 1024 * 1024))
    except ValueError as exc:
        raise ExpoError(f"{variant.describe(MANIFEST_FILE)}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ExpoError(f"{variant.describe(MANIFEST_FILE)}: JSON nested too deeply") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("files"), list)):
        raise ExpoError(f"{variant.describe(MANIFEST_FILE)}: not an expo-ray variant manifest")
    if not manifest["files"]:
        raise ExpoError(f"{variant.describe(MANIFEST_FILE)}: lists no files; a variant has at least its shards")
    for i, record in enumerate(manifest["files"]):
        if not _is_record(record):
            raise ExpoError(f"{variant.describe(MANIFEST_FILE)}: files[{i}] is not a file record "
                            f"(path, size and a {' or '.join(hashing.ALGORITHMS)} digest)")
    return manifest


def _is_record(record) -> bool:
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return False
    try:
        clean_key(record["path"])
    except StorageError:
        return False
    size, digests = record.get("size"), [record[n] for n in hashing.recorded(record)]
    return (type(size) is int and size >= 0 and bool(digests)
            and all(len(d) == 64 and all(c in "0123456789abcdef" for c in d) for d in digests))


@dataclass
class VerifyResult:
    location: str
    problems: list[str]
    files: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_variant(variant: Storage, deep: bool = True) -> VerifyResult:
    """Check every file of a variant against its manifest (size, recorded hashes, safetensors headers)."""
    result = VerifyResult(variant.describe(), [])
    try:
        manifest = read_manifest(variant)
    except ExpoError as exc:
        result.problems.append(str(exc))
        return result
    if manifest is None:
        result.problems.append(f"{variant.describe(MANIFEST_FILE)}: missing; the variant was never committed "
                               "(incomplete or still being written)")
        return result
    for record in manifest["files"]:
        key = record.get("path")
        try:
            if not variant.exists(key):
                result.problems.append(f"{variant.describe(key)}: listed in the manifest but missing")
                continue
            size = variant.size(key)
            if size != record.get("size"):
                result.problems.append(f"{variant.describe(key)}: {size} bytes, manifest says {record.get('size')}")
                continue
            if key.endswith(".safetensors"):
                read_header(variant, key)
            if deep:
                problem = _content_problem(variant, key, record)
                if problem:
                    result.problems.append(problem)
                    continue
            result.files += 1
            result.bytes += size
        except (InvalidCheckpoint, StorageError) as exc:
            result.problems.append(str(exc))
    listed = {r.get("path") for r in manifest["files"]}
    try:
        present = [k for k in variant.list() if "/" not in k and not k.startswith(".") and k != MANIFEST_FILE]
    except StorageError as exc:
        present = []
        result.problems.append(str(exc))
    for key in present:  # a loader would read these: they must be what was committed
        if key not in listed:
            result.problems.append(f"{variant.describe(key)}: present but not listed in the manifest")
    if INDEX_FILE in listed and variant.exists(INDEX_FILE):
        try:
            index = json.loads(variant.read_bytes(INDEX_FILE, limit=64 * 1024 * 1024))
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                result.problems.append(f"{variant.describe(INDEX_FILE)}: weight_map is not a mapping of tensor names "
                                       "to shards")
                weight_map = {}
            for shard in {s for s in weight_map.values() if isinstance(s, str)}:
                if shard not in listed:
                    result.problems.append(f"{variant.describe(INDEX_FILE)}: names {shard}, which the manifest does "
                                           "not list")
        except (ValueError, RecursionError) as exc:
            result.problems.append(f"{variant.describe(INDEX_FILE)}: not valid JSON "
                                   f"({str(exc) or 'nested too deeply'})")
        except StorageError as exc:
            result.problems.append(str(exc))
    return result


def find_variants(root: Storage) -> list[str]:
    """Variant folders under `root` (those with a manifest, and those with shards but none)."""
    folders = set()
    for key in root.list():
        parent, _, name = key.rpartition("/")
        if name == MANIFEST_FILE or name.endswith(".safetensors"):
            folders.add(parent)
    return sorted(folders)
