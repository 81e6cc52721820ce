"""Safetensors headers, validated completely before anything is allocated, and byte-range reads.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the data buffer; offsets are relative to the buffer and must tile it exactly.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from ..errors import InvalidCheckpoint
from ..storage import Reader, Storage

# Largest header accepted (the safetensors library uses the same bound).
MAX_HEADER_BYTES = 100 * 1024 * 1024

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard: where its bytes are, as absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first dimension (the whole tensor for scalars)."""
        return self.itemsize * math.prod(self.shape[1:]) if self.shape else self.nbytes


@dataclass(frozen=True)
class Header:
    """A validated shard header: tensors in file order, metadata, sizes."""

    path: str
    tensors: tuple[TensorInfo, ...]
    metadata: dict
    data_start: int
    file_size: int

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_header(label: str, prefix: bytes, header_bytes: bytes, file_size: int) -> Header:
    """Validate a header given its 8-byte prefix and JSON bytes; `label` names the file in errors."""
    def bad(problem: str) -> InvalidCheckpoint:
        return InvalidCheckpoint(f"{label}: invalid safetensors file: {problem}")

    (n,) = struct.unpack("<Q", prefix)
    data_start = 8 + n
    try:
        raw = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise bad("header JSON is nested too deeply") from None
    if not isinstance(raw, dict):
        raise bad("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")

    buffer_size = file_size - data_start
    tensors = []
    for name, entry in raw.items():
        if not name:
            raise bad("empty tensor name")
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r}: unknown or unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        if offsets[1] > buffer_size:
            raise bad(f"tensor {name!r}: data ends at byte {data_start + offsets[1]} but the file has {file_size} "
                      "bytes (truncated, or the header lies)")
        if math.prod(d for d in shape if d) * ITEMSIZE[dtype] >= 2 ** 63:
            raise bad(f"tensor {name!r}: shape {shape} is too large (no loader can address it)")
        nbytes = offsets[1] - offsets[0]
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if nbytes != expected:
            raise bad(f"tensor {name!r}: {nbytes} data bytes but shape {shape} of {dtype} needs {expected}")
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], nbytes))

    tensors.sort(key=lambda t: (t.start, t.nbytes))
    position = data_start
    for t in tensors:
        if t.start != position:
            what = "overlaps the previous tensor" if t.start < position else "leaves a gap after the previous tensor"
            raise bad(f"tensor {t.name!r} at offset {t.start - data_start} {what}")
        position = t.start + t.nbytes
    if position != file_size:
        raise bad(f"the tensors cover {position - data_start} data bytes but the file holds {buffer_size} (truncated "
                  "or trailing bytes)")
    return Header(label, tuple(tensors), dict(metadata), data_start, file_size)


def read_header(storage: Storage, key: str, reader: Reader | None = None) -> Header:
    """Read and validate the header of `key` with two small range reads."""
    label = storage.describe(key)
    own = reader is None
    reader = reader or storage.open_reader(key)
    try:
        size = reader.size
        if size < 8:
            raise InvalidCheckpoint(f"{label}: invalid safetensors file: {size} bytes, too short for a header")
        prefix = reader.read(0, 8)
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise InvalidCheckpoint(f"{label}: invalid safetensors file: header length {n} exceeds the "
                                    f"{MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            raise InvalidCheckpoint(f"{label}: invalid safetensors file: header length {n} is larger than the file "
                                    f"({size} bytes); truncated or not a safetensors file")
        return parse_header(label, prefix, reader.read(8, n), size)
    finally:
        if own:
            reader.close()


def read_rows(reader: Reader, info: TensorInfo, row_start: int, row_end: int) -> bytes:
    """The bytes of rows [row_start, row_end) of a tensor (first dimension)."""
    rows = info.shape[0] if info.shape else 1
    if not 0 <= row_start <= row_end <= rows:
        raise ValueError(f"rows [{row_start}, {row_end}) out of range for {info.name} with {rows} rows")
    return reader.read(info.start + row_start * info.row_bytes, (row_end - row_start) * info.row_bytes)


def read_tensor(reader: Reader, info: TensorInfo) -> bytes:
    return reader.read(info.start, info.nbytes)


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors laid out back to back in the given order.

    Returns (the 8-byte length + JSON padded to 8-byte alignment, each tensor's data offset).
    """
    entries: dict = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    offsets = []
    position = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        offsets.append(position)
        position += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body, offsets


def decode_floats(data: bytes, dtype: str):
    """Raw little-endian bytes of a float tensor as a NumPy float32 (float64 for F64) array."""
    import numpy as np

    if dtype == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == "F32":
        return np.frombuffer(data, dtype="<f4")
    if dtype == "F64":
        return np.frombuffer(data, dtype="<f8")
    raise ValueError(f"{dtype} is not a float dtype")
