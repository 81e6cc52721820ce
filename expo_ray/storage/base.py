"""The storage interface every backend implements: local folders, S3 and the Hugging Face Hub.

Paths passed to a Storage are relative, '/'-separated keys inside its root. Backends must
refuse keys that escape the root (absolute paths, '..' parts).
"""
from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod

from ..errors import StorageError


def clean_key(key: str) -> str:
    """Normalise a relative key and refuse anything that could escape the storage root."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"unsafe path {key!r}: must be a relative path inside the folder")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"unsafe path {key!r}: '.', '..' and empty parts are not allowed")
    return posixpath.join(*parts)


class Reader(ABC):
    """Random access to one object: byte ranges by offset, every read of one version of it.

    `pin` names that version in the form `Storage.pin` gives (size, mtime and inode of a local
    file; the ETag of an S3 object; the commit of a Hub file): a reader opened on a replaced
    object carries another pin, and an S3 reader's every request asks for its pin (`If-Match`)."""

    size: int
    pin: str = ""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`; raises StorageError if the object is shorter."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RangedReader(Reader):
    """A remote object read by ranged requests: a large read is split into `range_bytes` pieces
    fetched concurrently on `executor()`. Subclasses implement `_get` (one ranged request)."""

    label: str
    range_bytes: int

    @abstractmethod
    def _get(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, in one request (retried as the backend sees fit)."""

    @abstractmethod
    def executor(self):
        """The thread pool the pieces of a large read are fetched on."""

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(f"{self.label}: read of {length} bytes at offset {offset} is past the end of the "
                               f"object ({self.size} bytes); it is truncated or its header lies")
        if length == 0:
            return b""
        if length <= self.range_bytes:
            return self._get(offset, length)
        out = bytearray(length)

        def fetch(start: int) -> None:
            n = min(self.range_bytes, length - start)
            out[start:start + n] = self._get(offset + start, n)

        for f in [self.executor().submit(fetch, s) for s in range(0, length, self.range_bytes)]:
            f.result()
        return out


class Writer(ABC):
    """A streaming writer whose object appears under its final name only on commit()."""

    @abstractmethod
    def write(self, data) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the object visible under its final key (atomic)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; nothing becomes visible."""

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Storage(ABC):
    """A root location (folder, bucket prefix, hub repo) holding objects by relative key."""

    uri: str
    write_buffer_bytes: int = 0  # memory an open writer may hold (object stores buffer parts)
    # Backends with ranged uploads (several tasks write disjoint byte ranges of one object) have
    # begin_ranged(key, size) -> upload, open_range_writer(key, upload, offset) (write, finish,
    # abort), finish_ranged(key, upload, parts) and abort_ranged(key, upload).
    ranged_writes: bool = False

    @abstractmethod
    def open_reader(self, key: str) -> Reader: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    def version(self, key: str) -> str:
        """A tag that changes whenever the object's content may have changed (size and mtime,
        an ETag, a commit): identities built from headers alone would confuse two fine-tunes of
        one architecture, whose headers are identical."""
        return f"size={self.size(key)}"

    def pin(self, key: str) -> str:
        """The exact version of `key` now, in the form its readers' `pin` has: equal pins mean the
        same bytes (see :mod:`expo_ray.storage.pinned`)."""
        return self.version(key)

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (recursive), sorted. Backends refuse (StorageError) entries that
        are not regular files (FIFOs, sockets, devices): nothing may block on opening one."""

    @abstractmethod
    def open_writer(self, key: str, size_hint: int | None = None, if_absent: bool = False) -> Writer:
        """A streaming writer for `key`. `size_hint` (the final size, if known) lets object stores
        choose part sizes; with `if_absent` the commit fails with AlreadyExists if `key` exists
        (exactly-once creation, used for manifests)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Remove leftovers of interrupted writes under `prefix`; returns how many."""
        return 0

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """A whole (small) object; `limit` refuses objects larger than that many bytes."""
        with self.open_reader(key) as r:
            if limit is not None and r.size > limit:
                raise StorageError(f"{self.describe(key)}: {r.size} bytes, larger than the {limit}-byte limit for this "
                                   "kind of file")
            return r.read(0, r.size)

    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        with self.open_writer(key, size_hint=len(data), if_absent=if_absent) as w:
            w.write(data)
            w.commit()

    def location(self) -> tuple[str, ...]:
        """Where this root really is, as path parts (resolved links, normalised bucket/prefix): two
        spellings of one place give the same tuple, and a tuple that starts with another lies inside it."""
        return (self.uri,)

    def resolve(self, key: str) -> tuple[str, ...]:
        """Where `key` really is, in the form of `location()` (links followed)."""
        return (*self.location(), *clean_key(key).split("/"))

    def child(self, prefix: str) -> "Storage":
        """A storage rooted at `prefix` inside this one (refused where a link leads out of it)."""
        raise NotImplementedError

    def describe(self, key: str = "") -> str:
        """A human-readable location for messages."""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri
