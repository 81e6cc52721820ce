"""theta(alpha) = aligned + alpha * (aligned - sft), tensor by tensor, in memory: the computation
every path shares.

:func:`compute_chunk` is the one call of the kernel: ``expo-ray extrapolate``'s shard tasks use it
chunk by chunk, and :func:`iter_theta` (which a running engine's weight swap reads) tensor by
tensor, so both give bit-identical weights. :func:`iter_stored` gives a committed folder's tensors
as stored. Both iterators read only the part of each tensor asked for (rows, or columns of a 2-D
tensor: what one tensor-parallel rank keeps) and need neither torch nor vLLM.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from ..checkpoint.folder import Checkpoint
from ..checkpoint.safetensors_io import read_rows, read_tensor
from ..errors import ExpoError
from . import kernel
from .plan import COMPUTED, COPY_IDENTICAL, EXTEND_ROWS, EXTRAPOLATE, Plan, TensorPlan

# A part of a tensor: None (whole), ("rows", start, end) or ("cols", start, end) of a 2-D tensor.
Slice = tuple[str, int, int] | None
# (name, dtype, full shape, the part given, its bits: a numpy array or bytes)
Tensor = tuple[str, str, tuple[int, ...], Slice, "np.ndarray | bytes"]


class Stats(dict):
    """Bytes read, elements computed, tensors given in part or whole."""

    def __init__(self):
        super().__init__(bytes_read=0, elements_computed=0, sliced=0, whole=0)


def compute_chunk(t: TensorPlan, bits, a_bytes, s_bytes, effective, count, out_sets, slot):
    """theta for each effective alpha of `count` elements of tensor `t`.
    `out_sets[slot]` holds reusable output buffers (allocated here when missing or too small)."""
    a = np.frombuffer(a_bytes, dtype=bits)
    n_shared = 0 if s_bytes is None else len(s_bytes) // a.itemsize
    if out_sets[slot] is None or len(out_sets[slot][0]) < count:
        out_sets[slot] = [np.empty(count, dtype=bits) for _ in effective]
    outs = [o[:count] for o in out_sets[slot]]
    if n_shared:
        s = np.frombuffer(s_bytes, dtype=bits)
        kernel.extrapolate_into(t.dtype, a[:n_shared], s, effective, [o[:n_shared] for o in outs])
    for o in outs:  # rows only the aligned model has (added vocabulary) are copied
        o[n_shared:] = a[n_shared:]
    return outs


def read_part(reader, info, part: Slice) -> bytes:
    """The bytes of ``part`` of the tensor ``info`` (rows: one range; columns: one range per row)."""
    if part is None:
        return read_tensor(reader, info)
    kind, start, end = part
    if kind == "rows":
        return read_rows(reader, info, start, end)
    rows, width = info.shape[0], (end - start) * info.itemsize
    return b"".join(reader.read(info.start + r * info.row_bytes + start * info.itemsize, width) for r in range(rows))


def _valid(part: Slice, shape: tuple[int, ...]) -> bool:
    if part is None:
        return True
    kind, start, end = part
    if kind == "rows":
        return len(shape) >= 1 and 0 <= start <= end <= shape[0]
    return len(shape) == 2 and 0 <= start <= end <= shape[1]


class _Readers:
    """One open reader per shard of a source (pinned: see expo_ray.storage.pinned), closed together."""

    def __init__(self, storage):
        self.storage, self.opened = storage, {}

    def __call__(self, shard: str):
        if shard not in self.opened:
            self.opened[shard] = self.storage.open_reader(shard)
        return self.opened[shard]

    def close(self) -> None:
        for r in self.opened.values():
            r.close()


def iter_stored(ckpt: Checkpoint, part_of: Callable[[str], Slice], stats: dict) -> Iterator[Tensor]:
    """The tensors of ``ckpt`` as stored, one at a time (``part_of(name)``: the part to read)."""
    reader = _Readers(ckpt.source)
    try:
        for name, loc in ckpt.tensors.items():
            info = loc.info
            part = part_of(name)
            part = part if _valid(part, info.shape) else None
            data = read_part(reader(loc.shard), info, part)
            stats["bytes_read"] += len(data)
            stats["sliced" if part else "whole"] += 1
            yield name, info.dtype, tuple(info.shape), part, data
    finally:
        reader.close()


def iter_theta(plan: Plan, alpha: float, part_of: Callable[[str], Slice], stats: dict) -> Iterator[Tensor]:
    """theta(alpha) of every tensor of ``plan``, one at a time, bit-identical to what
    ``expo-ray extrapolate`` writes (``part_of(name)``: the part to read and compute)."""
    a_reader, s_reader = _Readers(plan.sources["aligned"]), _Readers(plan.sources["sft"])
    try:
        for shard in plan.shards:
            for t in shard.tensors:
                part = part_of(t.name)
                if not _valid(part, t.shape) or (part and part[0] == "cols" and t.action in (EXTEND_ROWS, COMPUTED)):
                    part = None
                stats["sliced" if part else "whole"] += 1
                a_bytes = read_part(a_reader(t.aligned.shard), t.aligned.info, part)
                stats["bytes_read"] += len(a_bytes)
                effective = alpha * t.scale
                if t.action == COPY_IDENTICAL:
                    s_bytes = read_part(s_reader(t.sft.shard), t.sft.info, part)
                    stats["bytes_read"] += len(s_bytes)
                    if a_bytes != s_bytes:
                        raise ExpoError(f"tensor {t.name} ({t.dtype}, not a float type) differs between the SFT "
                                        "and aligned models; non-float tensors must be identical")
                if t.action == COMPUTED:  # a_bytes are the SFT tensor's (rows), theta from t.compute
                    first = part[1] * (t.aligned.info.numel // t.shape[0]) if part else 0
                    count = len(a_bytes) // t.aligned.info.itemsize
                    (out,) = t.compute.chunk(first, count, a_bytes, [effective])
                    stats["elements_computed"] += count
                    yield t.name, t.dtype, tuple(t.shape), part, out
                elif t.action in (EXTRAPOLATE, EXTEND_ROWS) and effective != 0.0:
                    s_part = part
                    if t.action == EXTEND_ROWS:  # the SFT model has only the first shared_rows rows
                        lo, hi = (part[1], part[2]) if part else (0, t.shape[0])
                        s_part = ("rows", min(lo, t.shared_rows), min(hi, t.shared_rows))
                    s_bytes = read_part(s_reader(t.sft.shard), t.sft.info, s_part)
                    stats["bytes_read"] += len(s_bytes)
                    count = len(a_bytes) // t.aligned.info.itemsize
                    (out,) = compute_chunk(t, kernel.bits_dtype(t.dtype), a_bytes, s_bytes, [effective], count,
                                           [None], 0)
                    stats["elements_computed"] += count
                    yield t.name, t.dtype, tuple(t.shape), part, out
                else:
                    yield t.name, t.dtype, tuple(t.shape), part, a_bytes
    finally:
        a_reader.close()
        s_reader.close()
