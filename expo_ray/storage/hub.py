"""Read-only Hugging Face Hub sources: hf://org/name[@revision].

The revision is resolved to a commit once (recorded in manifests), together with every file's
size, in one API call. Files are then read by byte range over HTTP against that commit (the
Hub's ``resolve`` URL): planning reads only the safetensors headers, and each shard task only
its tensors, so nothing is copied whole onto the driver. A file already in the local Hugging
Face cache for that commit is read from there. With HF_HUB_OFFLINE=1 everything comes from a
populated cache. HF_TOKEN (or a token saved by ``hf auth login``) is sent for gated models.
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from ..errors import NotFound, StorageError
from .base import RangedReader, Reader, Storage, Writer, clean_key
from .local import LocalReader

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
MiB = 1024 * 1024
RANGE_BYTES = 16 * MiB   # a large read is split into ranged GETs of this size, fetched concurrently
READ_CONCURRENCY = int(os.environ.get("EXPO_RAY_HUB_READ_CONCURRENCY", "8"))
ATTEMPTS = int(os.environ.get("EXPO_RAY_HUB_ATTEMPTS", "6"))
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_resolved: dict[tuple[str, str, str], tuple[str, dict[str, int]]] = {}  # (endpoint, repo, commit) -> files


def cache_dir() -> str | None:
    """Read at call time (huggingface_hub reads its environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    """HF_ENDPOINT at call time (a Hub mirror, or a local server in tests)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def parse_hf_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("hf://"):].strip("/")
    repo, _, revision = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise StorageError(f"{uri}: expected hf://org/name[@revision]")
    return repo, revision or "main"


def _pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=READ_CONCURRENCY, thread_name_prefix="expo-hub")
        return _pool


class HubReader(RangedReader):
    """Byte ranges of one file of one commit, by ranged GETs on its resolve URL."""

    range_bytes = RANGE_BYTES

    def __init__(self, url: str, size: int, label: str):
        self.url, self.size, self.label = url, size, label

    def _get(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session

        headers = build_hf_headers()  # HF_TOKEN or the saved token; never printed
        headers.update({"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"})
        for attempt in range(ATTEMPTS):
            problem = None
            try:
                # Redirects (to a CDN for large files) are followed; httpx drops the token when
                # the redirect leaves the Hub's host.
                response = get_session().get(self.url, headers=headers, follow_redirects=True, timeout=120)
                if response.status_code == 206 or (response.status_code == 200 and offset == 0 and length == self.size):
                    data = response.content
                    if len(data) == length:
                        return data
                    problem = f"short read: {len(data)} of {length} bytes"
                elif response.status_code in (401, 403):
                    raise StorageError(f"{self.label}: the Hub refused access (HTTP {response.status_code}; "
                                       "a gated or private model needs HF_TOKEN)")
                elif response.status_code == 404:
                    raise NotFound(f"{self.label}: not found on the Hub")
                elif response.status_code == 200:
                    raise StorageError(f"{self.label}: the server ignored the byte range (HTTP 200 for a range "
                                       "request); it does not speak the Hub's protocol")
                elif response.status_code not in TRANSIENT_STATUS:
                    raise StorageError(f"{self.label}: HTTP {response.status_code} from the Hub")
                else:
                    problem = f"HTTP {response.status_code}"
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - connection errors of every kind are retried
                problem = f"{type(exc).__name__}: {exc}"
            if attempt == ATTEMPTS - 1:
                raise StorageError(f"{self.label}: the Hub did not answer after {ATTEMPTS} attempts ({problem})")
            time.sleep(min(20.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def executor(self) -> ThreadPoolExecutor:
        return _pool()


class HubStorage(Storage):
    def __init__(self, repo: str, revision: str = "main"):
        self.repo = repo
        self.revision = revision
        self._snapshot: str | None = None  # the cached snapshot folder, offline
        self.commit, self._sizes = self._resolve(repo, revision)
        self._files = sorted(self._sizes)
        self.uri = f"hf://{repo}@{self.commit}"

    def _resolve(self, repo: str, revision: str) -> tuple[str, dict[str, int]]:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        label = f"hf://{repo}@{revision}"
        try:
            if offline():
                # The cached snapshot: its folder name is the commit.
                path = snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=cache_dir())
                self._snapshot = path
                commit = os.path.basename(path.rstrip("/"))
                files = {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                         for d, _, fs in os.walk(path) for f in fs}
                return commit, files
            key = (endpoint(), repo, revision)
            if COMMIT_RE.match(revision) and key in _resolved:  # a commit never changes
                return _resolved[key]
            info = HfApi(endpoint=endpoint()).model_info(repo, revision=revision, files_metadata=True)
            files = {s.rfilename: int(s.size if s.size is not None else -1) for s in info.siblings or []}
            _resolved[(endpoint(), repo, info.sha)] = (info.sha, files)
            return info.sha, files
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise StorageError(f"{label}: no such repository or revision (or no access: set HF_TOKEN)") from None
        except LocalEntryNotFoundError:
            raise StorageError(f"{label}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise StorageError(f"{label}: the Hub refused access (HTTP {status}; a gated or private model needs "
                                   "HF_TOKEN)") from None
            raise StorageError(f"{label}: the Hub refused the request ({status or exc})") from None
        except OSError as exc:
            raise StorageError(f"{label}: cannot reach the Hub ({exc})") from None

    def _key(self, key: str) -> str:
        key = clean_key(key)
        if key not in self._sizes:
            raise NotFound(f"{self.describe(key)}: not in the repository")
        return key

    def cached_path(self, key: str) -> str | None:
        """The file in the local Hugging Face cache for this commit, if it is there."""
        key = self._key(key)
        if self._snapshot is not None:
            return os.path.join(self._snapshot, key)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo, key, cache_dir=cache_dir(), revision=self.commit)
        return found if isinstance(found, str) else None

    def open_reader(self, key: str) -> Reader:
        local = self.cached_path(key)
        if local is not None:
            reader = LocalReader(local, self.describe(key))
        else:
            key = self._key(key)
            if self._sizes[key] < 0:
                raise StorageError(f"{self.describe(key)}: the Hub did not give this file's size")
            url = f"{endpoint()}/{self.repo}/resolve/{self.commit}/{quote(key)}"
            reader = HubReader(url, self._sizes[key], self.describe(key))
        reader.pin = self.pin(key)  # the cache or the Hub: one commit, the same bytes
        return reader

    def exists(self, key: str) -> bool:
        return clean_key(key) in self._sizes

    def size(self, key: str) -> int:
        local = self.cached_path(key)
        return os.path.getsize(local) if local is not None else self._sizes[self._key(key)]

    def version(self, key: str) -> str:
        return f"commit={self.commit}"  # a commit fixes every file in it

    def pin(self, key: str) -> str:
        self._key(key)
        return self.version(key)

    def list(self, prefix: str = "") -> list[str]:
        base = clean_key(prefix) + "/" if prefix else ""
        return [f for f in self._files if f.startswith(base)]

    def open_writer(self, key: str, size_hint: int | None = None, if_absent: bool = False) -> Writer:
        raise StorageError(f"{self.describe(key)}: hf:// locations are read-only sources; write to a local path or "
                           "s3://")

    def delete(self, key: str) -> None:
        raise StorageError(f"{self.describe(key)}: hf:// locations are read-only")

    def location(self) -> tuple[str, ...]:
        return ("hf", *self.repo.split("/"), self.commit)  # two revisions of one repository are two models

    def child(self, prefix: str) -> "Storage":
        raise StorageError(f"{self.uri}: sub-folders of hub repositories are not supported as model folders")
