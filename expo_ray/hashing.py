"""Content hashes of the files a variant is made of, as recorded in its manifest.

BLAKE3 is the default: on one core it runs at about 2.5x sha256's speed here (4.2 vs 1.6 GB/s,
`benchmarks/RESULTS.md`), so hashing every output no longer costs as much as computing it.
sha256 -- what the Hub's LFS pointers hold -- is computed only when asked (`--sha256`).
A file record holds one digest per algorithm used, e.g. {"path", "size", "blake3": hex};
manifests written before BLAKE3 hold "sha256" alone and verify as before.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from blake3 import blake3

from .storage import Storage

BLAKE3 = "blake3"
SHA256 = "sha256"
ALGORITHMS = (BLAKE3, SHA256)  # every algorithm a record may hold, in the order they are checked
DEFAULT = (BLAKE3,)
READ_BLOCK = 16 * 1024 * 1024


def algorithms(sha256: bool = False) -> tuple[str, ...]:
    """The algorithms to record: BLAKE3, plus sha256 when asked."""
    return DEFAULT + ((SHA256,) if sha256 else ())


def _new(name: str):
    if name == BLAKE3:
        return blake3()
    if name == SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown hash algorithm {name!r}; expo-ray records {', '.join(ALGORITHMS)}")


class MultiHash:
    """Several digests of one byte stream, fed once."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._hashers = [_new(n) for n in self.names]

    def update(self, data) -> None:
        for h in self._hashers:
            h.update(data)

    def digests(self) -> dict[str, str]:
        return {n: h.hexdigest() for n, h in zip(self.names, self._hashers)}


def digest_bytes(data: bytes, names: Sequence[str] = DEFAULT) -> dict[str, str]:
    h = MultiHash(names)
    h.update(data)
    return h.digests()


def digest_file(storage: Storage, key: str, names: Sequence[str] = DEFAULT) -> tuple[int, dict[str, str]]:
    """(size, {algorithm: hex digest}) of a stored object, read once."""
    h = MultiHash(names)
    with storage.open_reader(key) as r:
        for offset in range(0, r.size, READ_BLOCK):
            h.update(r.read(offset, min(READ_BLOCK, r.size - offset)))
        return r.size, h.digests()


def recorded(record: dict) -> list[str]:
    """The algorithms a file record (manifest entry or receipt) holds a digest for."""
    return [n for n in ALGORITHMS if isinstance(record.get(n), str)]


def mismatches(record: dict, digests: dict[str, str]) -> Iterable[str]:
    """The algorithms whose recorded digest differs from the computed one."""
    return [n for n in recorded(record) if digests.get(n) != record[n]]
