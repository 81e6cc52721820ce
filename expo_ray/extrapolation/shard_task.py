"""One aligned shard (or one byte range of it) -> the same bytes of every alpha's output shard.

Runs inside a Ray task (or inline). Reads the aligned shard and the SFT tensors it needs by
byte range, computes every alpha from one read, writes each output shard as a stream whose
header is known up front, and returns a small record (sizes, content hashes) -- never tensors.
Memory is bounded by `chunk_bytes`, whatever the tensor sizes. A piece (`ShardJob.file_range`)
writes one byte range of every output file into a ranged upload that the driver opened and
commits once every piece of the file is done; the output headers have one length for every
alpha, so a byte range means the same tensor elements in every variant.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .._version import __version__
from ..checkpoint import hashing
from ..checkpoint.folder import MANIFEST_FILE
from ..checkpoint.safetensors_io import encode_header
from ..errors import ExpoError
from ..options import format_alpha
from ..storage import Reader, Source, Storage, Writer, open_storage
from . import kernel
from .finite import check_chunk
from .plan import COMPUTED, COPY_IDENTICAL, EXTEND_ROWS, EXTRAPOLATE, ShardPlan, TensorPlan
from .theta import compute_chunk

# Input chunks in flight (current + prefetched) and output buffer sets (being computed + being written).
INPUT_BUFFERS = 2
OUTPUT_BUFFERS = 2
MIN_CHUNK_ELEMENTS = 4096
ALPHA_FIELD_WIDTH = 32  # characters reserved for the alpha in the output header (repr of a float: <= 24)
# Fault-injection knob for tests of killed workers, drivers and storage outages: sleep this many
# seconds after each chunk so that a run is slow enough to be interrupted mid-shard.
CHUNK_DELAY_S = float(os.environ.get("EXPO_RAY_CHUNK_DELAY_S", "0") or 0)


@dataclass(frozen=True)
class ShardJob:
    """Everything a task needs, small enough to send to a Ray worker."""

    shard: ShardPlan
    sft: Source                 # the inputs, pinned to the versions the plan read: a file
    aligned: Source             # replaced since is refused when opened, never mixed in
    out_uri: str
    alphas: tuple[float, ...]
    variants: tuple[str, ...]   # folder per alpha, relative to out_uri
    fingerprints: tuple[str, ...]  # identity of each variant (inputs, alpha, rules), for resume
    chunk_bytes: int
    allow_nonfinite: bool = False  # inputs may hold NaN/Inf (else refused)
    hashes: tuple[str, ...] = hashing.DEFAULT  # content hashes recorded for each output
    file_range: tuple[int, int] | None = None   # a piece: these bytes of every output file ...
    uploads: tuple[str, ...] = ()               # ... written into these ranged uploads (one per variant)


def chunk_elements(chunk_bytes: int, itemsize: int, n_alphas: int) -> int:
    """Elements per chunk so that all live buffers fit in `chunk_bytes`."""
    per_element = itemsize * (2 * INPUT_BUFFERS + OUTPUT_BUFFERS * n_alphas)
    return max(MIN_CHUNK_ELEMENTS, chunk_bytes // per_element // 64 * 64)


def output_header(job: ShardJob, alpha: float) -> bytes:
    metadata = dict(job.shard.metadata)
    metadata.setdefault("format", "pt")
    metadata.update({
        "expo_ray.version": __version__,
        "expo_ray.alpha": format_alpha(alpha),
    })  # no source URIs here: the same inputs give the same bytes wherever they are stored
    header, _ = encode_header([(t.name, t.dtype, t.shape) for t in job.shard.tensors], metadata)
    # Pad so that the length does not depend on the alpha: the data of every variant then starts
    # at the same offset, and a byte range of the file is the same elements in every variant.
    body = header[8:].rstrip(b" ") + b" " * (ALPHA_FIELD_WIDTH - len(format_alpha(alpha)))
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body


def output_size(job: ShardJob) -> int:
    """Bytes of each output file of the shard (the same for every alpha)."""
    return len(output_header(job, 0.0)) + job.shard.nbytes


class _Outputs:
    """The per-alpha output streams: write order, content hashes and size of each."""

    def __init__(self, writers: list[Writer], hashes: tuple[str, ...], offset: int = 0):
        self.writers = writers
        self.hashes = [hashing.RangeHash(hashes, offset) for _ in writers]
        self.sizes = [0] * len(writers)

    def write(self, i: int, data) -> None:
        view = memoryview(data).cast("B")
        self.writers[i].write(view)
        self.hashes[i].update(view)
        self.sizes[i] += len(view)

    def write_all(self, chunks, hasher: ThreadPoolExecutor) -> None:
        """Write one chunk per output while another thread hashes them (both release the GIL)."""
        views = [memoryview(c).cast("B") for c in chunks]
        hashed = hasher.submit(lambda: [h.update(v) for h, v in zip(self.hashes, views)])
        for i, view in enumerate(views):
            self.writers[i].write(view)
            self.sizes[i] += len(view)
        hashed.result()  # the chunk buffers may be reused once this returns

    def commit(self, keep: list[bool]) -> None:
        """Make the outputs with keep[i] visible; discard the others."""
        for w, k in zip(self.writers, keep):
            if k:
                w.commit()
            else:
                w.abort()

    def abort(self) -> None:
        for w in self.writers:
            try:
                w.abort()
            except Exception:  # noqa: BLE001 - best effort cleanup after the real error
                pass


@dataclass(frozen=True)
class _IO:
    reader: ThreadPoolExecutor   # prefetches the next chunk of the aligned tensor
    side: ThreadPoolExecutor     # reads the matching SFT chunk at the same time
    writer: ThreadPoolExecutor   # one thread: chunks are written strictly in order
    hasher: ThreadPoolExecutor   # content hashes of the outputs, alongside the writes

    def shutdown(self) -> None:
        for pool in (self.reader, self.side, self.writer, self.hasher):
            pool.shutdown(wait=True)


def _ranges(first: int, stop: int, step: int):
    """(start, count) element ranges covering elements [first, stop)."""
    for start in range(first, stop, step):
        yield start, min(step, stop - start)


RECEIPTS = ".expo-ray/receipts"


def receipt_key(variant: str, shard: str) -> str:
    """Where a finished output shard's receipt lives (relative to the destination root)."""
    return f"{RECEIPTS}/{variant}/{shard}.json"


def finished_output(out_store: Storage, variant: str, shard: str, fingerprint: str,
                    hashes: tuple[str, ...]) -> dict | None:
    """The record of an output shard an earlier run finished, re-verified; None if not done."""
    key = receipt_key(variant, shard)
    if not out_store.exists(key):
        return None
    try:
        receipt = json.loads(out_store.read_bytes(key, limit=1 << 20))
    except ValueError:
        return None
    if receipt.get("fingerprint") != fingerprint or not out_store.exists(f"{variant}/{shard}"):
        return None
    if not set(hashes) <= set(hashing.recorded(receipt)):
        return None  # written with other hashes than this run records: compute it again
    size, digests = hashing.digest_file(out_store, f"{variant}/{shard}", hashes)
    if size != receipt.get("size") or hashing.mismatches(receipt, digests):
        return None
    return {"size": size, **digests, "version": out_store.version(f"{variant}/{shard}")}


def _committed(out_store: Storage, variant: str) -> bool:
    return out_store.exists(f"{variant}/{MANIFEST_FILE}")


def run_shard(job: ShardJob, progress=None) -> dict:
    """Execute one shard; returns {"shard", "files": {variant: {size, <hash>: hex}}, "resumed": [...], timings}.

    Output shards that an interrupted earlier run finished (receipt present, content re-hashed
    and matching) are kept; only the missing alphas are computed.
    """
    t_start = time.perf_counter()
    out_store = open_storage(job.out_uri)
    files, resumed = {}, []
    for variant, fingerprint in zip(job.variants, job.fingerprints):
        record = finished_output(out_store, variant, job.shard.key, fingerprint, job.hashes)
        if record is not None:
            files[variant] = record
            resumed.append(variant)
    todo = [i for i, v in enumerate(job.variants) if v not in files]
    stats = {"bytes_read": 0, "compute_seconds": 0.0}
    if todo:
        sub = dataclasses.replace(job, alphas=tuple(job.alphas[i] for i in todo),
                                  variants=tuple(job.variants[i] for i in todo),
                                  fingerprints=tuple(job.fingerprints[i] for i in todo))
        written, stats = _compute_shard(sub, out_store, progress)
        for variant, fingerprint in zip(sub.variants, sub.fingerprints):
            files[variant] = written[variant]
            if _committed(out_store, variant):
                continue
            receipt = {**{k: v for k, v in written[variant].items() if k != "version"}, "fingerprint": fingerprint}
            out_store.write_bytes(receipt_key(variant, job.shard.key), json.dumps(receipt).encode())
    elif progress is not None:
        progress(job.shard.nbytes)
    return {"shard": job.shard.key, "files": {v: files[v] for v in job.variants}, "resumed": resumed,
            "seconds": time.perf_counter() - t_start, "kernel": kernel.backend(), **stats}


class _Readers:
    """Readers of the input shards a job needs, opened on first use (each checked against the
    version the plan read)."""

    def __init__(self, job: ShardJob):
        self.sources = {"aligned": job.aligned, "sft": job.sft}
        self.open: dict[tuple[str, str], Reader] = {}

    def __call__(self, which: str, shard: str) -> Reader:
        if (which, shard) not in self.open:
            self.open[(which, shard)] = self.sources[which].open_reader(shard)
        return self.open[(which, shard)]

    def close(self) -> None:
        for r in self.open.values():
            r.close()


def _io_pool() -> "_IO":
    return _IO(ThreadPoolExecutor(1, thread_name_prefix="expo-read"),
               ThreadPoolExecutor(1, thread_name_prefix="expo-read-sft"),
               ThreadPoolExecutor(1, thread_name_prefix="expo-write"),
               ThreadPoolExecutor(1, thread_name_prefix="expo-hash"))


def _write_range(job: ShardJob, headers: list[bytes], lo: int, hi: int, outputs: "_Outputs", readers, io_pool,
                 progress) -> tuple[float, int]:
    """Write bytes [lo, hi) of every output file, in order; returns (compute seconds, bytes read)."""
    compute_s, read = 0.0, 0
    if lo < len(headers[0]):
        for i, header in enumerate(headers):
            outputs.write(i, header[lo:min(hi, len(header))])
    position = len(headers[0])  # where the current tensor's data starts in the file
    for t in job.shard.tensors:
        b0, b1 = max(lo, position) - position, min(hi, position + t.nbytes) - position
        position += t.nbytes
        if b0 < b1:
            compute_s += _stream_tensor(job, t, readers, outputs, io_pool, progress, b0, b1)
            read += b1 - b0 + (0 if t.sft is None else min(b1, t.sft.info.nbytes) - min(b0, t.sft.info.nbytes))
    io_pool.writer.submit(lambda: None).result()
    return compute_s, read


def _compute_shard(job: ShardJob, out_store: Storage, progress) -> tuple[dict, dict]:
    headers = [output_header(job, alpha) for alpha in job.alphas]
    size = len(headers[0]) + job.shard.nbytes if headers else None
    writers = []
    try:
        for variant in job.variants:
            writers.append(out_store.open_writer(f"{variant}/{job.shard.key}", size_hint=size))
    except Exception:
        for w in writers:
            w.abort()
        raise
    outputs = _Outputs(writers, job.hashes)
    readers, io_pool = _Readers(job), _io_pool()
    try:
        compute_s, read = _write_range(job, headers, 0, size, outputs, readers, io_pool, progress)
        # A committed variant is immutable: never replace a file of one another run committed meanwhile.
        outputs.commit([not _committed(out_store, v) for v in job.variants])
    except BaseException:
        io_pool.writer.shutdown(wait=True)  # no write may race the cleanup
        outputs.abort()
        raise
    finally:
        io_pool.shutdown()
        readers.close()
    # The stored version (mtime, ETag) lets the commit notice a file another run replaced meanwhile.
    def version(key: str) -> str | None:
        return out_store.version(key) if out_store.exists(key) else None

    written = {v: {"size": outputs.sizes[i],
                   **hashing.combine(job.hashes, [outputs.hashes[i].result()], outputs.sizes[i]),
                   "version": version(f"{v}/{job.shard.key}")}
               for i, v in enumerate(job.variants)}
    return written, {"bytes_read": read, "compute_seconds": compute_s}


def run_piece(job: ShardJob, progress=None) -> dict:
    """Write bytes `job.file_range` of every variant's output file into its ranged upload.

    Returns {"shard", "range", "files": {variant: {"hashes": RangeHash result, "upload": what the
    storage needs to commit the file}}, timings}. Re-running a piece rewrites the same bytes."""
    t_start = time.perf_counter()
    out_store = open_storage(job.out_uri)
    lo, hi = job.file_range
    headers = [output_header(job, alpha) for alpha in job.alphas]
    writers = [out_store.open_range_writer(f"{v}/{job.shard.key}", upload, lo)
               for v, upload in zip(job.variants, job.uploads)]
    outputs = _Outputs(writers, job.hashes, lo)
    readers, io_pool = _Readers(job), _io_pool()
    try:
        compute_s, read = _write_range(job, headers, lo, hi, outputs, readers, io_pool, progress)
        uploaded = [w.finish() for w in writers]
    except BaseException:
        io_pool.writer.shutdown(wait=True)
        outputs.abort()
        raise
    finally:
        io_pool.shutdown()
        readers.close()
    files = {v: {"hashes": outputs.hashes[i].result(), "upload": uploaded[i]} for i, v in enumerate(job.variants)}
    return {"shard": job.shard.key, "range": [lo, hi], "files": files, "bytes_read": read,
            "compute_seconds": compute_s, "seconds": time.perf_counter() - t_start, "kernel": kernel.backend()}


def _stream_tensor(job: ShardJob, t: TensorPlan, reader, outputs: _Outputs, io_pool, progress,
                   b0: int = 0, b1: int | None = None) -> float:
    """Stream bytes [b0, b1) of one output tensor through the kernel chunk by chunk; returns
    seconds spent computing. A range boundary inside an element computes that element whole."""
    info = t.aligned.info
    n_alpha = len(job.alphas)
    effective = [a * t.scale for a in job.alphas]
    computed = t.action == COMPUTED  # theta from the SFT tensor (read as `aligned`) by t.compute
    needs_compute = computed or (t.action in (EXTRAPOLATE, EXTEND_ROWS) and any(e != 0.0 for e in effective))
    needs_sft = (needs_compute and not computed) or t.action == COPY_IDENTICAL
    itemsize = info.itemsize
    b1 = t.nbytes if b1 is None else b1
    first, stop = b0 // itemsize, -(-b1 // itemsize)
    head, tail = b0 - first * itemsize, stop * itemsize - b1  # bytes of split elements to leave out
    step = chunk_elements(job.chunk_bytes, itemsize, n_alpha)
    shared = t.shared_rows * (info.numel // info.shape[0]) if t.action == EXTEND_ROWS else info.numel
    bits = kernel.bits_dtype(t.dtype) if needs_compute else None

    a_reader = reader("aligned", t.aligned.shard)
    s_reader = reader("sft", t.sft.shard) if needs_sft else None

    def read(start: int, count: int):
        s = None
        if needs_sft and start < shared:
            n = min(count, shared - start)
            s = io_pool.side.submit(s_reader.read, t.sft.info.start + start * itemsize, n * itemsize)
        a = a_reader.read(info.start + start * itemsize, count * itemsize)
        return a, (s.result() if s is not None else None)

    def clip(chunks, k):
        if not (head and k == 0) and not (tail and k == len(ranges) - 1):
            return chunks
        cut = [memoryview(c).cast("B") for c in chunks]
        return [c[head if k == 0 else 0:len(c) - (tail if k == len(ranges) - 1 else 0)] for c in cut]

    out_sets = [None] * OUTPUT_BUFFERS
    writes = [None] * OUTPUT_BUFFERS
    compute_s = 0.0
    ranges = list(_ranges(first, stop, step))
    next_read = io_pool.reader.submit(read, *ranges[0]) if ranges else None
    for k, (start, count) in enumerate(ranges):
        a_bytes, s_bytes = next_read.result()
        if k + 1 < len(ranges):
            next_read = io_pool.reader.submit(read, *ranges[k + 1])
        slot = k % OUTPUT_BUFFERS
        if writes[slot] is not None:
            writes[slot].result()  # the buffers of this slot are free again
        if t.action == COPY_IDENTICAL and a_bytes != s_bytes:
            kind = (f"FP8 ({t.dtype}): FP8 weights are not extrapolated (dequantize both checkpoints first), only "
                    "copied"
                    if t.dtype.startswith("F8_") else f"{t.dtype}, not a float type: it is copied")
            raise ExpoError(f"tensor {t.name} is {kind} and must be identical in both models, but it differs "
                            "between the SFT and aligned models")
        if not needs_compute:
            chunks = [a_bytes] * n_alpha
        else:
            began = time.perf_counter()
            chunks = (t.compute.chunk(start, count, a_bytes, effective, _buffers(out_sets, slot, count, bits, n_alpha))
                      if computed else compute_chunk(t, bits, a_bytes, s_bytes, effective, count, out_sets, slot))
            compute_s += time.perf_counter() - began
        # (a COMPUTED tensor's compute checks its own results for overflow)
        check_chunk(t.name, t.dtype, a_bytes, s_bytes, effective, [_alpha_label(a, t.scale) for a in job.alphas],
                    chunks if needs_compute and not computed else None, job.allow_nonfinite)
        writes[slot] = io_pool.writer.submit(outputs.write_all, clip(chunks, k), io_pool.hasher)
        if progress is not None:
            progress(count * itemsize)
        if CHUNK_DELAY_S:
            time.sleep(CHUNK_DELAY_S)
    for w in writes:
        if w is not None:
            w.result()
    return compute_s


def _buffers(out_sets: list, slot: int, count: int, bits, n: int) -> list:
    """``n`` reusable output arrays of ``count`` elements for ``slot`` (allocated when missing or too small)."""
    import numpy as np

    if out_sets[slot] is None or len(out_sets[slot][0]) < count:
        out_sets[slot] = [np.empty(count, dtype=bits) for _ in range(n)]
    return [o[:count] for o in out_sets[slot]]


def _alpha_label(alpha: float, scale: float) -> str:
    return f"{alpha!r}" + (f" (x scale {scale!r})" if scale != 1.0 else "")
