"""Local-folder storage: positional reads, temp-file + rename writes.

Reads are confined to the folder: a file that is a link to somewhere outside it is refused (the
Hugging Face cache's links from a snapshot into its own blobs excepted). Writes are confined
too: a folder on the way that is a link out of the root is refused before anything is created
or replaced, and temp files are created without following links. Only regular files are listed
or opened: a FIFO or a device in a folder is refused by name, never opened (opening a FIFO
blocks until someone writes to it).
"""
from __future__ import annotations

import hashlib
import os
import socket
import stat
import uuid
from pathlib import Path

from ..errors import AlreadyExists, NotFound, StorageError
from .base import Reader, Storage, Writer, clean_key

TEMP_MARK = ".expo-partial-"
# Temp names carry this host and the writing process, so that cleaning up leftovers of killed
# writers never removes a file another live run is still writing.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _writer_alive(temp_name: str) -> bool:
    """Whether the process that is writing `temp_name` is alive (on this host)."""
    host, _, rest = temp_name[len(TEMP_MARK):].partition("-")
    pid = rest.partition("-")[0]
    if host != HOST_TAG or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(pid) != 0


def _kind(mode: int) -> str | None:
    """What a file that is not a regular file is (None for a regular file)."""
    for test, name in ((stat.S_ISREG, None), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def not_regular(label: str, mode: int) -> StorageError:
    return StorageError(f"{label}: {_kind(mode)}, not a regular file; refused")


def file_pin(st: os.stat_result) -> str:
    """A local file's version: its size, modification time and inode. A file replaced by a rename
    gets another inode, one rewritten in place another mtime."""
    return f"size={st.st_size},mtime_ns={st.st_mtime_ns},ino={st.st_ino}"


class LocalReader(Reader):
    def __init__(self, path: Path, label: str):
        self.label = label
        try:
            # O_NONBLOCK: opening a FIFO does not wait for a writer (it is refused just below);
            # reads of a regular file ignore the flag.
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise NotFound(f"{label}: file not found") from None
        except OSError as exc:
            raise StorageError(f"{label}: cannot open ({exc.strerror})") from None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            self._fd = -1
            raise not_regular(label, st.st_mode)
        self.size = st.st_size
        self.pin = file_pin(st)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(f"{self.label}: read of {length} bytes at offset {offset} is past the end of the file "
                               f"({self.size} bytes); the file is truncated or its header lies")
        chunks = []
        while length > 0:
            data = os.pread(self._fd, length, offset)
            if not data:
                raise StorageError(f"{self.label}: file shrank while reading (offset {offset})")
            chunks.append(data)
            offset += len(data)
            length -= len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def temp_name(final: Path) -> Path:
    return final.with_name(f"{TEMP_MARK}{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}")


def create_new(path: Path, mode: int = 0o666) -> int:
    """A new file, never through a link (fails if anything exists under the name)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


class LocalWriter(Writer):
    def __init__(self, final: Path, label: str, if_absent: bool = False):
        self.final = final
        self.label = label
        self.if_absent = if_absent
        self.temp = temp_name(final)
        self._f = os.fdopen(create_new(self.temp), "wb")

    def write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as exc:  # disk full, quota, I/O error
            self.abort()
            raise StorageError(f"{self.label}: cannot write ({exc.strerror or exc})") from None

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            if self.if_absent:
                os.link(self.temp, self.final)  # fails if the final name exists: exactly-once
                self.temp.unlink()
            else:
                os.replace(self.temp, self.final)
        except FileExistsError:
            self.abort()
            raise AlreadyExists(f"{self.label}: already exists (written by another run)") from None
        except OSError as exc:
            self.abort()
            raise StorageError(f"{self.label}: cannot write ({exc.strerror})") from None

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass


class LocalRangeWriter:
    """Writes one byte range of a ranged upload (a temp file of the final size) in order."""

    def __init__(self, path: Path, label: str, offset: int):
        self.label = label
        self.offset = offset
        try:
            self._fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            raise StorageError(f"{label}: cannot write ({exc.strerror}); was the upload aborted?") from None

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while len(view):
                n = os.pwrite(self._fd, view, self.offset)
                self.offset += n
                view = view[n:]
        except OSError as exc:  # disk full, quota, I/O error (a sparse temp file fills up as it is written)
            raise StorageError(f"{self.label}: cannot write ({exc.strerror or exc})") from None

    def finish(self) -> dict:
        """Flush this range to the disk (in parallel with the other ranges' tasks)."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(f"{self.label}: cannot write ({exc.strerror or exc})") from None
        finally:
            self.abort()
        return {}

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalStorage(Storage):
    ranged_writes = True

    def __init__(self, root: str | os.PathLike):
        try:
            self.root = Path(root).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise StorageError(f"{os.fsdecode(root)}: not a usable path "
                               f"({getattr(exc, 'strerror', None) or exc})") from None
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def _inside(self, real: Path) -> bool:
        return real == self.root or self.root in real.parents

    def _write_path(self, key: str) -> Path:
        """Where `key` is written: its folder, links resolved, must lie inside the root (created
        here); the name itself is replaced by rename, never written through."""
        path = self._path(key)
        real = Path(os.path.realpath(path.parent))
        if not self._inside(real):
            raise StorageError(f"{self.describe(key)}: {path.parent} is a link to {real}, outside {self.root}; "
                               "refused (expo-ray never writes through a link out of the destination)")
        try:
            real.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.describe(key)}: cannot write ({exc.strerror})") from None
        return real / path.name

    def _confined(self, key: str) -> Path:
        """The path of `key` for reading, refusing links that lead out of the folder."""
        path = self._path(key)
        real = Path(os.path.realpath(path))
        allowed = [self.root]
        if self.root.parent.name == "snapshots":  # a Hugging Face cache snapshot links into its blobs
            allowed.append(self.root.parent.parent / "blobs")
        if not any(real == a or a in real.parents for a in allowed):
            raise StorageError(f"{self.describe(key)}: is a link to {real}, outside the folder; refused "
                               "(copy the file into the folder instead)")
        return path

    def open_reader(self, key: str) -> LocalReader:
        return LocalReader(self._confined(key), self.describe(key))

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise StorageError(f"{self.describe(key)}: cannot access ({exc.strerror})") from None

    def _stat(self, key: str) -> os.stat_result:
        try:
            return self._confined(key).stat()
        except FileNotFoundError:
            raise NotFound(f"{self.describe(key)}: file not found") from None
        except OSError as exc:
            raise StorageError(f"{self.describe(key)}: cannot access ({exc.strerror})") from None

    def size(self, key: str) -> int:
        return self._stat(key).st_size

    def version(self, key: str) -> str:
        st = self._stat(key)
        return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"

    def pin(self, key: str) -> str:
        st = self._stat(key)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(self.describe(key), st.st_mode)
        return file_pin(st)

    def location(self) -> tuple[str, ...]:
        return ("file", *self.root.parts)

    def resolve(self, key: str) -> tuple[str, ...]:
        return ("file", *Path(os.path.realpath(self._path(key))).parts)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        try:
            if not base.is_dir():
                return []
        except OSError as exc:
            raise StorageError(f"{self.describe(prefix)}: cannot access ({exc.strerror})") from None

        def refuse(exc: OSError):
            where = Path(exc.filename).relative_to(self.root).as_posix() if exc.filename else prefix
            raise StorageError(f"{self.describe(where if where != '.' else '')}: cannot read the folder "
                               f"({exc.strerror})")
        keys = []
        for dirpath, _dirs, files in os.walk(base, onerror=refuse):
            for name in files:
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                try:
                    mode = os.stat(Path(dirpath, name)).st_mode
                except OSError:  # a broken link: reading it says so
                    mode = stat.S_IFREG
                if not stat.S_ISREG(mode):
                    raise not_regular(self.describe(key), mode)
                keys.append(key)
        return sorted(keys)

    def open_writer(self, key: str, size_hint: int | None = None, if_absent: bool = False) -> LocalWriter:
        final = self._write_path(key)
        try:
            return LocalWriter(final, self.describe(key), if_absent)
        except OSError as exc:
            raise StorageError(f"{self.describe(key)}: cannot write ({exc.strerror})") from None

    # Ranged uploads: a temp file of the final size that several tasks write disjoint ranges of;
    # it appears under its final name (fsync, rename) only in finish_ranged.
    def begin_ranged(self, key: str, size: int) -> str:
        final = self._write_path(key)
        try:
            # Named after this (driver) process, which owns the upload until it is finished or aborted.
            temp = temp_name(final)
            fd = create_new(temp, 0o644)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"{self.describe(key)}: cannot write ({exc.strerror})") from None
        return temp.name

    def _upload_path(self, key: str, upload: str) -> Path:
        final = self._write_path(key)
        if "/" in upload or not upload.startswith(TEMP_MARK):
            raise StorageError(f"{self.describe(key)}: not a ranged upload: {upload!r}")
        return final.with_name(upload)

    def open_range_writer(self, key: str, upload: str, offset: int) -> LocalRangeWriter:
        return LocalRangeWriter(self._upload_path(key, upload), self.describe(key), offset)

    def finish_ranged(self, key: str, upload: str, parts: list) -> None:
        temp = self._upload_path(key, upload)
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self._write_path(key))
        except OSError as exc:
            raise StorageError(f"{self.describe(key)}: cannot write ({exc.strerror})") from None

    def abort_ranged(self, key: str, upload: str) -> None:
        try:
            self._upload_path(key, upload).unlink()
        except FileNotFoundError:
            pass

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not self._inside(Path(os.path.realpath(path.parent))):
            raise StorageError(f"{self.describe(key)}: {path.parent} is a link out of {self.root}; refused")
        try:
            path.unlink()  # a link itself is removed, never what it points to
        except FileNotFoundError:
            pass

    def cleanup_incomplete(self, prefix: str = "") -> int:
        stale = [k for k in self.list(prefix)
                 if k.rpartition("/")[2].startswith(TEMP_MARK) and not _writer_alive(k.rpartition("/")[2])]
        for key in stale:
            self.delete(key)
        return len(stale)

    def child(self, prefix: str) -> "LocalStorage":
        real = Path(os.path.realpath(self._path(prefix)))
        if not self._inside(real):
            raise StorageError(f"{self.describe(prefix)}: is a link to {real}, outside {self.root}; refused")
        return LocalStorage(real)
