"""Content hashes of the files a variant is made of, as recorded in its manifest.

The default, "blake3_16mib_tree", is BLAKE3 over the concatenated 32-byte BLAKE3 digests of the
file's 16 MiB blocks (the last one shorter): BLAKE3 runs at about 2.5x sha256's speed on one core
here, and the blocks can be hashed by the tasks that write them, in parallel, so a file written in
row ranges by several tasks needs no second read. sha256 -- what the Hub's LFS pointers hold -- is
computed only when asked (`--sha256`), and needs one task to write the whole file in order. A file
record holds one digest per algorithm used ({"path", "size", "blake3_16mib_tree": hex, ...});
manifests written before hold "sha256" alone and verify as before.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from blake3 import blake3

from ..storage import Storage

TREE = "blake3_16mib_tree"
SHA256 = "sha256"
ALGORITHMS = (TREE, SHA256)  # every algorithm a record may hold, in the order they are checked
DEFAULT = (TREE,)
WHOLE_FILE = (SHA256,)       # algorithms that need the whole file, in order, from one writer
BLOCK = 16 * 1024 * 1024


def algorithms(sha256: bool = False) -> tuple[str, ...]:
    """The algorithms to record: the BLAKE3 block tree, plus sha256 when asked."""
    return DEFAULT + ((SHA256,) if sha256 else ())


def tree_root(block_digests: Sequence[str]) -> str:
    """The tree digest from the hex BLAKE3 digests of a file's blocks, in order."""
    return blake3(b"".join(bytes.fromhex(d) for d in block_digests)).hexdigest()


class RangeHash:
    """Hashes of bytes written in order from `offset` (a multiple of BLOCK): the BLAKE3 digest of
    every block that starts in the range, and the whole-file digests when the range is the file."""

    def __init__(self, names: Sequence[str], offset: int = 0):
        for n in names:
            if n not in ALGORITHMS:
                raise ValueError(f"unknown hash algorithm {n!r}; expo-ray records {', '.join(ALGORITHMS)}")
        if offset % BLOCK:
            raise ValueError(f"a hashed range must start on a {BLOCK}-byte block boundary, not at {offset}")
        if offset and set(names) & set(WHOLE_FILE):
            raise ValueError(f"{', '.join(WHOLE_FILE)} needs the whole file from one writer")
        self.names = tuple(names)
        self.first_block = offset // BLOCK
        self._blocks: list[str] = []
        self._block = blake3()
        self._filled = 0
        self._whole = [hashlib.sha256() for n in self.names if n == SHA256]

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        for h in self._whole:
            h.update(view)
        while len(view):
            take = min(len(view), BLOCK - self._filled)
            self._block.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK:
                self._blocks.append(self._block.hexdigest())
                self._block, self._filled = blake3(), 0

    def result(self) -> dict:
        """{"first_block", "blocks": [hex...], and "sha256" if asked}: small, for a task's record."""
        blocks = self._blocks + ([self._block.hexdigest()] if self._filled else [])
        out = {"first_block": self.first_block, "blocks": blocks}
        if self._whole:
            out[SHA256] = self._whole[0].hexdigest()
        return out


def combine(names: Sequence[str], ranges: Sequence[dict], size: int) -> dict[str, str]:
    """The digests of a file of `size` bytes from the RangeHash results of the ranges that cover it."""
    blocks: dict[int, str] = {}
    for r in ranges:
        for i, d in enumerate(r["blocks"]):
            blocks[r["first_block"] + i] = d
    count = -(-size // BLOCK)
    if sorted(blocks) != list(range(count)):
        raise ValueError(f"block hashes of {count} block(s) expected, got blocks {sorted(blocks)}")
    out = {}
    if TREE in names:
        out[TREE] = tree_root([blocks[i] for i in range(count)])
    if SHA256 in names:
        whole = [r[SHA256] for r in ranges if SHA256 in r]
        if len(whole) != 1:
            raise ValueError("sha256 needs exactly one range covering the whole file")
        out[SHA256] = whole[0]
    return out


def digest_bytes(data: bytes, names: Sequence[str] = DEFAULT) -> dict[str, str]:
    h = RangeHash(names)
    h.update(data)
    return combine(names, [h.result()], len(data))


def digest_file(storage: Storage, key: str, names: Sequence[str] = DEFAULT) -> tuple[int, dict[str, str]]:
    """(size, {algorithm: hex digest}) of a stored object, read once."""
    h = RangeHash(names)
    with storage.open_reader(key) as r:
        for offset in range(0, r.size, BLOCK):
            h.update(r.read(offset, min(BLOCK, r.size - offset)))
        return r.size, combine(names, [h.result()], r.size)


def recorded(record: dict) -> list[str]:
    """The algorithms a file record (manifest entry or receipt) holds a digest for."""
    return [n for n in ALGORITHMS if isinstance(record.get(n), str)]


def mismatches(record: dict, digests: dict[str, str]) -> list[str]:
    """The algorithms whose recorded digest differs from the computed one."""
    return [n for n in recorded(record) if digests.get(n) != record[n]]
