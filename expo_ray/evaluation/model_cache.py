"""A bounded cache of remote models on a node's local disk, for vLLM (which loads local folders).

One folder per model identity under the cache root (``EXPO_RAY_MODEL_CACHE``, default
``$TMPDIR/expo-ray-models``; on clusters a mounted NVMe volume). The cache never grows past its
cap (``EXPO_RAY_MODEL_CACHE_GB``; by default what the cache holds plus the disk's free space,
less a reserve): before a model is copied, the least recently used models that no engine is
using are deleted until it fits. An engine process holds a lease on the model it serves (a
file naming its pid, so a killed process holds nothing); leased models are never evicted. A
model that cannot fit even in an empty cache is refused with one line.

Files are copied with concurrent ranged reads (several files at once, each read by ranges that
the S3 and Hub readers fetch concurrently) into a temporary folder renamed into place when
complete, so a half-copied model is never used. Decisions are made under a file lock, and a
copy in progress reserves its size, so processes sharing a node share one cap.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExpoError
from ..storage import LocalStorage, open_storage

log = logging.getLogger("expo_ray")

GiB = 1024 ** 3
COMPLETE = ".complete"     # written last: the folder holds the whole model
PARTIAL = ".partial-"      # a copy in progress: <PARTIAL><id>, with its reserved size
LEASES = ".leases"         # <entry>--<pid>--<token>: an engine process uses <entry>
READ_BYTES = 64 * 1024 * 1024
FILES_AT_ONCE = int(os.environ.get("EXPO_RAY_MODEL_CACHE_FILES_AT_ONCE", "4"))


class CacheFull(ExpoError):
    """A model does not fit in the local model cache."""


def default_root() -> Path:
    return Path(os.environ.get("EXPO_RAY_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "expo-ray-models"))


def configured_cap() -> int | None:
    """EXPO_RAY_MODEL_CACHE_GB in bytes (GiB, fractions allowed), None when unset."""
    text = os.environ.get("EXPO_RAY_MODEL_CACHE_GB", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ExpoError(f"EXPO_RAY_MODEL_CACHE_GB={text!r}: expected a positive number of GiB")
    return int(value * GiB)


def _gib(n: int) -> str:
    return f"{n / GiB:.3g} GiB"


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelCache:
    def __init__(self, root: str | os.PathLike | None = None, cap_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / LEASES).mkdir(exist_ok=True)
        self._cap = cap_bytes

    @property
    def cap(self) -> int:
        configured = self._cap if self._cap is not None else configured_cap()
        if configured is not None:
            return configured
        disk = shutil.disk_usage(self.root)
        return max(0, self.used() + disk.free - max(GiB, disk.total // 20))

    # -- what is there -------------------------------------------------------------------------

    def entries(self) -> list[Path]:
        """Complete models, least recently used first."""
        done = [p for p in self.root.iterdir() if (p / COMPLETE).is_file()]
        return sorted(done, key=lambda p: (p / COMPLETE).stat().st_mtime_ns)

    def used(self) -> int:
        """Bytes on disk plus the reservations of copies in progress."""
        total = 0
        for p in self.root.iterdir():
            if p.name.startswith(PARTIAL):
                total += max(self._reserved(p), _tree_bytes(p))
            elif p.is_dir() and p.name != LEASES:
                total += _tree_bytes(p)
        return total

    @staticmethod
    def _reserved(partial: Path) -> int:
        try:
            return int((partial / ".reserved").read_text())
        except (OSError, ValueError):
            return 0

    def in_use(self, entry: Path) -> bool:
        for lease in (self.root / LEASES).glob(f"{entry.name}--*"):
            pid = int(lease.name.split("--")[1])
            if _alive(pid):
                return True
            lease.unlink(missing_ok=True)  # its process is gone
        return False

    @contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- leases ------------------------------------------------------------------------------------

    def _lease(self, entry: Path) -> None:
        (self.root / LEASES / f"{entry.name}--{os.getpid()}--{uuid.uuid4().hex[:8]}").touch()

    def release(self, path: str | os.PathLike) -> None:
        """This process no longer uses the model at ``path`` (a folder this cache returned)."""
        name = Path(path).name
        for lease in (self.root / LEASES).glob(f"{name}--{os.getpid()}--*"):
            lease.unlink(missing_ok=True)

    # -- getting a model ---------------------------------------------------------------------------

    def checkout(self, uri: str, identity: str, skip=lambda key: False) -> str:
        """A local folder holding the model at ``uri`` (keys for which ``skip`` is true left out),
        copied if needed, with a lease for this process (see :meth:`release`)."""
        entry = self.root / identity[:32]
        with self._locked():
            if (entry / COMPLETE).is_file():
                os.utime(entry / COMPLETE)
                self._lease(entry)
                return str(entry)
        src = open_storage(uri)
        keys = [k for k in src.list() if not skip(k)]
        sizes = {k: src.size(k) for k in keys}
        need = sum(sizes.values())
        with self._locked():
            if (entry / COMPLETE).is_file():  # another process copied it meanwhile
                os.utime(entry / COMPLETE)
                self._lease(entry)
                return str(entry)
            partial = self._reserve(uri, need)
        try:
            self._copy(src, keys, sizes, partial)
            (partial / COMPLETE).write_text(json.dumps({"uri": uri, "identity": identity, "bytes": need}))
            (partial / ".reserved").unlink()
            with self._locked():
                if (entry / COMPLETE).is_file():
                    shutil.rmtree(partial, ignore_errors=True)
                else:
                    shutil.rmtree(entry, ignore_errors=True)  # an incomplete leftover
                    os.rename(partial, entry)
                self._lease(entry)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return str(entry)

    def _reserve(self, uri: str, need: int) -> Path:
        """Evict until ``need`` bytes fit; returns the reserved temporary folder (lock held)."""
        cap = self.cap
        if need > cap:
            raise CacheFull(f"{uri}: the model needs {_gib(need)}, more than the local model cache's cap of "
                            f"{_gib(cap)} at {self.root}; raise --model-cache-gb (EXPO_RAY_MODEL_CACHE_GB) or "
                            "point --model-cache (EXPO_RAY_MODEL_CACHE) at a larger disk")
        used = self.used()
        for old in self.entries():
            if used + need <= cap:
                break
            if self.in_use(old):
                continue
            size = _tree_bytes(old)
            shutil.rmtree(old, ignore_errors=True)
            used -= size
            log.info("model cache %s: evicted %s (%.2f GiB, least recently used, no engine uses it)",
                     self.root, old.name, size / GiB)
        if used + need > cap:
            raise CacheFull(f"{uri}: the model needs {_gib(need)} but the local model cache at {self.root} has "
                            f"{_gib(cap - used)} of its {_gib(cap)} cap free, the rest held by models "
                            "engines are using; raise --model-cache-gb (EXPO_RAY_MODEL_CACHE_GB)")
        partial = self.root / f"{PARTIAL}{uuid.uuid4().hex[:12]}"
        partial.mkdir()
        (partial / ".reserved").write_text(str(need))
        return partial

    @staticmethod
    def _copy(src, keys: list[str], sizes: dict[str, int], dst_dir: Path) -> None:
        dst = LocalStorage(dst_dir)

        def one(key: str) -> None:
            with src.open_reader(key) as r, dst.open_writer(key) as w:
                for offset in range(0, r.size, READ_BYTES):
                    w.write(r.read(offset, min(READ_BYTES, r.size - offset)))
                w.commit()

        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=FILES_AT_ONCE, thread_name_prefix="expo-cache") as pool:
            for f in [pool.submit(one, k) for k in sorted(keys, key=lambda k: -sizes[k])]:
                f.result()
        log.info("model cache: copied %s (%.2f GiB) in %.1f s", src.describe(), sum(sizes.values()) / GiB,
                 time.perf_counter() - began)
