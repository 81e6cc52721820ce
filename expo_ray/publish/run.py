"""Executes a plan on Ray: tasks per aligned shard (or byte range of one), then commits each variant.

Re-running the same job is safe and cheap: committed variants are skipped, output shards an
interrupted run finished are re-verified and kept, leftovers of interrupted writes are removed,
and the outputs are byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from ..checkpoint import hashing
from ..checkpoint.identity import variant_fingerprint
from ..cluster.ray_runtime import ProgressBar, ensure_ray, task_options
from ..errors import ExpoError
from ..extrapolation import kernel, pieces
from ..extrapolation.plan import Plan
from ..extrapolation.shard_task import ShardJob, run_piece, run_shard
from ..options import WriteOptions, variant_name
from ..storage import Storage
from . import lease
from .commit import COMMITTED_BY_OTHER, commit_variant, owned_files, same_job_committed, write_root_index
from .destination import check_destination
from .lease import Lease
from .manifest import read_manifest

log = logging.getLogger("expo_ray")

# Memory Ray reserves per task beyond the chunk and upload buffers (interpreter, libraries).
TASK_BASE_MEMORY = 512 * 1024 * 1024
TASK_MAX_RETRIES = 3


@dataclass
class ExtrapolationResult:
    out_uri: str
    variants: dict[str, str] = field(default_factory=dict)   # variant -> "written" | "already complete"
    seconds: float = 0.0
    bytes_written: int = 0
    bytes_read: int = 0
    shards_resumed: int = 0


def _shard_task(job: ShardJob, tracker):
    progress = (lambda n: tracker.add.remote(n)) if tracker is not None else None
    return run_piece(job, progress) if job.file_range else run_shard(job, progress)


def run_plan(plan: Plan, out_uri: str, *, write: WriteOptions = WriteOptions(), address: str | None = None,
             show_progress: bool = True) -> ExtrapolationResult:
    """Write every variant of `plan` under `out_uri`, skipping work already done. Every file is
    recorded with its BLAKE3 hash, and also its sha256 (as Hub LFS pointers hold) if `write.sha256`.

    Every input read is of the version the plan read (`plan.sources`): a file replaced or edited
    since fails the run, naming it, and nothing is committed. Each variant folder is written under
    its lease (:mod:`expo_ray.publish.lease`) and committed holding exactly its manifest's files."""
    began = time.perf_counter()
    out = check_destination(out_uri, plan.sources, tuple(plan.variants))
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
    leases: list[Lease] = []
    committed = set()
    try:
        for name, fingerprint in zip(names, fingerprints):
            leases.append(lease.acquire(out, name, fingerprint, owned_files(plan)))
        for held in leases:  # leftovers of earlier runs go now, and foreign files are refused before any work
            lease.settle_folder(out, held)
        with lease.Keeper(leases):
            records = _run_tasks(plan, out, todo, names, fingerprints, write, address, show_progress, result)
            if records is None:  # committed meanwhile by another run of the same job
                committed.update(names)
                write_root_index(out)
                return result
            for source in plan.sources.values():  # what the tasks read is still what the plan read
                source.recheck()
            hashes = write_hashes(write)
            for alpha, name, fingerprint, held in zip(todo, names, fingerprints, leases):
                result.variants[name] = commit_variant(plan, out, name, alpha, records, fingerprint, hashes, held)
                committed.add(name)
    finally:
        for held in leases:
            held.release(committed=held.variant in committed)
    write_root_index(out)
    result.bytes_written = sum(r["files"][n]["size"] for r in records for n in names if n not in r["resumed"])
    result.bytes_read = sum(r["bytes_read"] for r in records)
    result.seconds = time.perf_counter() - began
    return result


def write_hashes(write: WriteOptions) -> tuple[str, ...]:
    return hashing.algorithms(write.sha256)


def _run_tasks(plan: Plan, out: Storage, todo: list[float], names: tuple[str, ...], fingerprints: tuple[str, ...],
               write: WriteOptions, address: str | None, show_progress: bool,
               result: ExtrapolationResult) -> list[dict] | None:
    """Every output shard of the variants to do, by Ray tasks; their records (None: another run of
    the same job committed them all meanwhile)."""
    fallback = kernel.fallback_warning()
    if fallback:
        log.warning("%s", fallback)
    log.debug("kernel backend on the driver: %s", kernel.backend())
    ray = ensure_ray(address)
    chunk_bytes = int(write.chunk_mib * 1024 * 1024)
    memory = TASK_BASE_MEMORY + chunk_bytes + len(todo) * out.write_buffer_bytes
    from ..cluster.capacity import cluster_capacity  # a task no node can hold would wait forever: refuse now

    cluster_capacity(ray).check({"CPU": 1, "memory": memory}, "an extrapolation task (--chunk-mib "
                                                              f"{write.chunk_mib:g})")
    hashes = write_hashes(write)
    jobs = [ShardJob(shard, plan.sources["sft"], plan.sources["aligned"], out.uri, tuple(todo), names, fingerprints,
                     chunk_bytes, plan.options.allow_nonfinite, hashes)
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
            return bar.wait(refs, describe=lambda j: _task_label(out, j))

        try:
            if pieces.usable(out, hashes):  # byte ranges of the outputs, as many as the CPUs can use
                records = pieces.run(jobs, out, int(ray.cluster_resources().get("CPU", 1)), submit)
            else:  # one task per shard, each output streamed in order
                records = submit(jobs)
        except ExpoError:
            # Another run of the same job may have committed these variants meanwhile (and removed
            # what this run was writing): that is success, not failure.
            if not all(same_job_committed(out.child(n), f) for n, f in zip(names, fingerprints)):
                raise
            result.variants.update({n: COMMITTED_BY_OTHER for n in names})
            return None
    slow = sorted({r["shard"] for r in records if "numpy" in r.get("kernel", "")})
    if slow and kernel.fallback_warning() is None and os.environ.get("EXPO_RAY_KERNEL", "").lower() != "numpy":
        log.warning("%d shard(s) were computed with the NumPy kernel on worker nodes without the C kernel (same bits, "
                    "about 35x slower arithmetic): install expo-ray there with a C compiler present", len(slow))
    result.shards_resumed = sum(len(r["resumed"]) for r in records)
    if result.shards_resumed:
        log.info("resumed: %d output shard(s) were already written by an earlier run and verified",
                 result.shards_resumed)
    return records


def _task_name(job: ShardJob) -> str:
    where = f"[{job.file_range[0]}:{job.file_range[1]}]" if job.file_range else ""
    return f"extrapolate:{job.shard.key}{where}"


def _task_label(out: Storage, job: ShardJob) -> str:
    """What a failed task was writing, for its one-line error."""
    folder = job.variants[0] if len(job.variants) == 1 else "{" + ",".join(job.variants) + "}"
    where = f" (bytes {job.file_range[0]}-{job.file_range[1]})" if job.file_range else ""
    return f"{out.describe(folder)}/{job.shard.key}{where}"
