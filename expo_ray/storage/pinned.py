"""An input folder pinned to the versions of its files that a plan read.

A run reads its inputs at several times and places: the plan reads headers and configs on the
driver, tasks read tensors on workers, the commit copies side files. Each of those reads must be
of the version the plan saw, or a checkpoint replaced mid-run (another job re-uploading it, an
edited config) would be mixed into a variant that verifies. A :class:`Source` is opened once,
when planning; every file it reads or `pin`s there is pinned to its version, and the Source
travels with the plan (pickled: the URI and the pins, the storage reopened where it lands), so
that every later read checks the pin:

- local: size, mtime and inode, compared when a file is opened (an open file keeps reading the
  inode it opened; a rewrite in place changes the mtime, which `recheck` sees afterwards);
- S3: the ETag, which every ranged GET asks for (`If-Match`) and whose answer is compared;
- Hugging Face Hub: the commit the revision resolved to (a commit fixes every file in it).

A file whose version differs raises :class:`~expo_ray.errors.SourceChanged`, one line naming
it: "changed since the plan: re-run to plan again". Usage, for any kind of input folder::

    src = Source.open(uri)                 # once, when planning
    with src.open_reader("model.safetensors") as r:   # pins the file (first open) ...
        header = r.read(0, 8)
    src.pin("tokenizer.json")              # ... or pins a file the run will read later
    # ... the Source travels to tasks; there the same calls check the pins:
    data = src.read_bytes("tokenizer.json")
    src.recheck()                          # every pinned file still as planned (before a commit)
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..errors import NotFound, SourceChanged, StorageError
from .base import Reader, Storage
from .uri import open_storage

CHANGED = "changed since the plan: re-run to plan again"


class Source:
    """One input folder of a plan: its storage, its resolved location and the pinned version of
    every file the plan read or will copy."""

    def __init__(self, storage: Storage, pins: dict[str, str] | None = None):
        self._storage: Storage | None = storage
        self.uri = storage.uri
        self.location = storage.location()  # resolved: links followed, bucket/prefix normalised
        self.pins: dict[str, str] = dict(pins or {})
        self.sealed = False  # once it has travelled (pickled), no file may be pinned anew

    @classmethod
    def open(cls, source: "str | Storage | Source") -> "Source":
        if isinstance(source, Source):
            return source
        if isinstance(source, str):
            source = open_storage(source)
        return cls(source)

    @property
    def storage(self) -> Storage:
        if self._storage is None:  # reopened where the Source landed (a Ray worker)
            self._storage = open_storage(self.uri)
        return self._storage

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "location": self.location, "pins": self.pins}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _storage=None, sealed=True)

    def describe(self, key: str = "") -> str:
        return self.storage.describe(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.storage.list(prefix)

    def _check(self, key: str, pin: str) -> None:
        if key not in self.pins:
            if self.sealed:
                raise StorageError(f"{self.describe(key)}: not read when planning (not pinned); refused")
            self.pins[key] = pin
        elif pin != self.pins[key]:
            raise SourceChanged(f"{self.describe(key)}: {CHANGED}")

    def pin(self, key: str) -> str:
        """Pin `key` at its current version (if not pinned yet); returns its pin."""
        if key not in self.pins:
            self._check(key, self.storage.pin(key))
        return self.pins[key]

    def open_reader(self, key: str) -> Reader:
        """A reader of exactly the pinned version of `key` (pinning it if it is not yet)."""
        try:
            reader = self.storage.open_reader(key)
        except NotFound:
            if key in self.pins:  # it was there when the plan read it
                raise SourceChanged(f"{self.describe(key)}: {CHANGED}") from None
            raise
        try:
            self._check(key, reader.pin)
        except BaseException:
            reader.close()
            raise
        if hasattr(reader, "changed"):  # S3: a replacement found mid-read is a change since the plan
            reader.changed = CHANGED
        return reader

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """A whole (small) file, of the pinned version: checked when opened and after reading."""
        with self.open_reader(key) as r:
            if limit is not None and r.size > limit:
                raise StorageError(f"{self.describe(key)}: {r.size} bytes, larger than the {limit}-byte limit for "
                                   "this kind of file")
            data = r.read(0, r.size)
        self.recheck([key])
        return bytes(data)

    def recheck(self, keys: list[str] | None = None) -> None:
        """Every pinned file (or those of `keys`) is still its pinned version, else SourceChanged."""
        keys = sorted(self.pins) if keys is None else keys
        if not keys:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            now = dict(zip(keys, pool.map(self._current, keys)))
        for key in keys:
            if now[key] != self.pins[key]:
                raise SourceChanged(f"{self.describe(key)}: {CHANGED}")

    def _current(self, key: str) -> str | None:
        try:
            return self.storage.pin(key)
        except NotFound:
            return None
