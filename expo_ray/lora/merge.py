"""Merged variants of a LoRA adapter: theta = theta_sft + (1 + alpha) * s * B @ A, tensor by tensor.

:class:`LoraDelta` is the computation of one SFT tensor that an adapter changes (a
:data:`~expo_ray.extrapolation.plan.COMPUTED` tensor of the plan); the shard tasks call
:meth:`LoraDelta.chunk` for each chunk of elements they stream, for every alpha at once. The
delta is built in row blocks of at most :data:`BLOCK_ELEMENTS` elements in float64 (a 70B MLP
delta, 8192 x 28672, is never built whole) and each value ``base + c * delta`` is rounded once
into the SFT tensor's dtype. ``base`` is the SFT tensor, or, when the adapter also holds the
tensor whole (``modules_to_save``, trained biases, a saved base layer), that tensor extrapolated
against the SFT one: ``w + alpha * (w - sft)`` -- by the correctly rounded kernel when nothing
else is added, else in float64 with the delta, rounded once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..checkpoint.safetensors_io import TensorInfo, decode_floats
from ..errors import ExpoError
from ..extrapolation import kernel
from ..storage import Source

BLOCK_ELEMENTS = 1 << 20   # float64 temporaries per block: 8 MiB each
_CACHE_ENTRIES = 8         # decoded lora_A / lora_B matrices kept per process (they are small)
_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()


def read_raw(adapter: Source, info: TensorInfo, start: int = 0, count: int | None = None) -> bytes:
    """The bytes of elements [start, start + count) of tensor ``info`` of the adapter file, at the
    version ``adapter`` pinned (an adapter folder opened when planning)."""
    from .adapter import WEIGHTS_FILE

    count = info.numel - start if count is None else count
    with adapter.open_reader(WEIGHTS_FILE) as reader:
        return reader.read(info.start + start * info.itemsize, count * info.itemsize)


def read_floats(adapter: Source, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
    """Elements [start, start + count) of tensor ``info`` of the adapter file, as float64."""
    return decode_floats(read_raw(adapter, info, start, count), info.dtype).astype(np.float64)


def load_matrix(adapter: Source, info: TensorInfo) -> np.ndarray:
    from .adapter import WEIGHTS_FILE

    key = (adapter.uri, adapter.pins.get(WEIGHTS_FILE), info.name, info.start)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    values = read_floats(adapter, info).reshape(info.shape)
    if not np.isfinite(values).all():
        raise ExpoError(f"{adapter.describe()}: tensor {info.name} holds NaN or Inf values; refused")
    with _lock:
        _cache[key] = values
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return values


@dataclass(frozen=True)
class LoraDelta:
    """theta(alpha) of one SFT tensor changed by an adapter (see the module docstring).

    A weight: ``scale * B @ A`` (``.T`` when ``transposed``: embeddings, Conv1D); a bias: ``scale * b``
    (``lora_B.bias``). ``whole``: the adapter's tensor that replaces the SFT one as the aligned base.
    """

    name: str
    adapter: Source                 # the adapter folder, pinned when planning
    dtype: str                      # the SFT tensor's dtype: the output's
    shape: tuple[int, ...]
    scale: float = 0.0
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    transposed: bool = False
    bias: TensorInfo | None = None
    whole: TensorInfo | None = None

    def chunk(self, start: int, count: int, sft_bytes, alphas: list[float],
              outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Raw bits of elements [start, start + count) of theta for each tensor alpha (written into
        ``outs``, one array of ``count`` elements per alpha, when given)."""
        bits = kernel.bits_dtype(self.dtype)
        outs = outs if outs is not None else [np.empty(count, dtype=bits) for _ in alphas]
        low_rank = self.a is not None or self.bias is not None
        if not low_rank and self.whole.dtype == self.dtype:  # the kernel, exactly as for full checkpoints
            w_bits = np.frombuffer(read_raw(self.adapter, self.whole, start, count), dtype=bits)
            s_bits = np.frombuffer(sft_bytes, dtype=bits)
            kernel.extrapolate_into(self.dtype, w_bits, s_bits, alphas, outs)
            self._check(outs, alphas, w_bits, s_bits)
            return outs
        itemsize = np.dtype(bits).itemsize
        block = max(1, BLOCK_ELEMENTS // self._row_length()) * self._row_length()
        with np.errstate(all="ignore"):
            for lo in range(0, count, block):
                hi = min(count, lo + block)
                s = decode_floats(memoryview(sft_bytes)[lo * itemsize:hi * itemsize], self.dtype).astype(np.float64)
                w = read_floats(self.adapter, self.whole, start + lo, hi - lo) if self.whole else None
                d = self._delta(start + lo, hi - lo) if low_rank else None
                for alpha, out in zip(alphas, outs):
                    value = s if w is None else w + alpha * (w - s)
                    if d is not None:
                        value = value + ((1.0 + alpha) * self.scale) * d
                    out[lo:hi] = kernel.round_float64(self.dtype, value)
        self._check(outs, alphas, sft_bytes)
        return outs

    def _row_length(self) -> int:
        return self.shape[1] if len(self.shape) == 2 else 1

    def _delta(self, start: int, count: int) -> np.ndarray:
        """B @ A (or b) for flat elements [start, start + count), in float64."""
        if self.a is None:  # a bias
            return load_matrix(self.adapter, self.bias)[start:start + count]
        cols = self.shape[1]
        r0, r1 = start // cols, (start + count - 1) // cols + 1
        a, b = load_matrix(self.adapter, self.a), load_matrix(self.adapter, self.b)
        rows = a[:, r0:r1].T @ b.T if self.transposed else b[r0:r1] @ a  # (r1 - r0, cols)
        offset = start - r0 * cols
        return rows.reshape(-1)[offset:offset + count]

    def _check(self, outs, alphas, *inputs) -> None:
        """Finite inputs must give finite results: an alpha that overflows the dtype is refused."""
        from ..extrapolation.finite import nonfinite_mask

        carried = np.zeros(len(outs[0]), dtype=bool) if outs else None
        for data in inputs:
            carried |= nonfinite_mask(np.asarray(data) if isinstance(data, np.ndarray) else data, self.dtype)
        if carried is not None and carried.any():
            raise ExpoError(f"tensor {self.name} ({self.dtype}) of the SFT model or the adapter holds NaN or Inf "
                            "values; refused")
        for alpha, out in zip(alphas, outs):
            bad = nonfinite_mask(out, self.dtype)
            if bad.any():
                raise ExpoError(f"tensor {self.name} ({self.dtype}): alpha {alpha!r} overflows, turning finite "
                                f"weights into Inf ({int(bad.sum())} value(s) in one chunk exceed the range of "
                                f"{self.dtype}); use a smaller alpha")
