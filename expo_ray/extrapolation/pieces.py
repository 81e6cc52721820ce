"""Work below the shard: byte-range pieces of the output files, as many as the cluster's CPUs
can use, so that a large shard never runs alone at the end.

`split` is pure. `run` is the driver's side: it skips output files an interrupted run finished,
opens one ranged upload per remaining file, has the pieces write disjoint byte ranges of it (every
offset is fixed by the header), and commits each file, with its block-tree hash put together from
the pieces' block hashes, once all its pieces are done. A piece that fails is retried by Ray and
rewrites the same bytes; if the run fails, every upload not committed is aborted.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable

from ..checkpoint import hashing
from ..checkpoint.folder import MANIFEST_FILE
from ..storage import Storage
from .shard_task import ShardJob, finished_output, output_size, receipt_key

log = logging.getLogger("expo_ray")

PIECES_PER_CPU = 3             # enough that the last pieces to finish are short
MIN_PIECE = 4 * hashing.BLOCK  # below this the per-task overhead is not worth it


def split(sizes: dict[str, int], cpus: int) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges [lo, hi) covering each file, cut at hash-block boundaries, about
    total / (cpus * PIECES_PER_CPU) bytes each (at least MIN_PIECE)."""
    total = sum(sizes.values())
    target = max(MIN_PIECE, -(-total // max(1, cpus * PIECES_PER_CPU)))
    out = {}
    for key, size in sizes.items():
        blocks = max(1, -(-size // hashing.BLOCK))
        n = max(1, min(blocks, -(-size // target)))
        bounds = [min(size, blocks * i // n * hashing.BLOCK) for i in range(n)] + [size]
        out[key] = [(bounds[i], bounds[i + 1]) for i in range(n)]
    return out


def usable(out: Storage, hashes: tuple[str, ...]) -> bool:
    """Pieces need ranged uploads, and no whole-file hash (sha256 needs one writer in order)."""
    return out.ranged_writes and not set(hashes) & set(hashing.WHOLE_FILE)


def run(jobs: list[ShardJob], out: Storage, cpus: int, submit: Callable[[list[ShardJob]], list[dict]]) -> list[dict]:
    """Execute whole-shard jobs as pieces; returns one record per job, as run_shard does."""
    records, pending, uploads = [], [], {}
    try:
        for job in jobs:
            record = {"shard": job.shard.key, "files": {}, "resumed": [], "bytes_read": 0, "compute_seconds": 0.0}
            for variant, fingerprint in zip(job.variants, job.fingerprints):
                done = finished_output(out, variant, job.shard.key, fingerprint, job.hashes)
                if done is not None:
                    record["files"][variant] = done
                    record["resumed"].append(variant)
            todo = [i for i, v in enumerate(job.variants) if v not in record["files"]]
            records.append(record)
            if not todo:
                continue
            sub = dataclasses.replace(job, alphas=tuple(job.alphas[i] for i in todo),
                                      variants=tuple(job.variants[i] for i in todo),
                                      fingerprints=tuple(job.fingerprints[i] for i in todo))
            size = output_size(sub)
            for v in sub.variants:
                uploads[(v, job.shard.key)] = out.begin_ranged(f"{v}/{job.shard.key}", size)
            pending.append((record, sub, size))
        ranges = split({sub.shard.key: size for _, sub, size in pending}, cpus)
        pieces = [dataclasses.replace(sub, file_range=r,
                                      uploads=tuple(uploads[(v, sub.shard.key)] for v in sub.variants))
                  for _, sub, _ in pending for r in ranges[sub.shard.key]]
        pieces.sort(key=lambda p: p.file_range[0] - p.file_range[1])  # largest first
        log.info("%d output file(s) in %d piece(s) for %d CPU(s)", len(uploads), len(pieces), cpus)
        results = submit(pieces) if pieces else []
        for record, sub, size in pending:
            mine = [r for r in results if r["shard"] == sub.shard.key]
            record["bytes_read"] = sum(r["bytes_read"] for r in mine)
            record["compute_seconds"] = sum(r["compute_seconds"] for r in mine)
            record["kernel"] = ",".join(sorted({r["kernel"] for r in mine}))
            for variant, fingerprint in zip(sub.variants, sub.fingerprints):
                key = f"{variant}/{sub.shard.key}"
                parts = [r["files"][variant]["upload"] for r in sorted(mine, key=lambda r: r["range"][0])]
                digests = hashing.combine(sub.hashes, [r["files"][variant]["hashes"] for r in mine], size)
                upload = uploads.pop((variant, sub.shard.key))
                record["files"][variant] = {"size": size, **digests}
                if out.exists(f"{variant}/{MANIFEST_FILE}"):
                    # A committed variant is immutable: another run of the same job committed it meanwhile.
                    out.abort_ranged(key, upload)
                    continue
                out.finish_ranged(key, upload, parts)
                record["files"][variant]["version"] = out.version(key)
                receipt = dict(size=size, **digests, fingerprint=fingerprint)
                out.write_bytes(receipt_key(variant, sub.shard.key), json.dumps(receipt).encode())
    except BaseException:
        for (variant, shard), upload in uploads.items():
            try:
                out.abort_ranged(f"{variant}/{shard}", upload)
            except Exception:  # noqa: BLE001 - best effort cleanup after the real error
                pass
        raise
    for record, job in zip(records, jobs):
        record["files"] = {v: record["files"][v] for v in job.variants}
    return records
