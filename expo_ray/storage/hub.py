"""Read-only Hugging Face Hub sources: hf://org/name[@revision].

The revision is resolved to a commit once (recorded in manifests); files are fetched into the
standard Hugging Face cache with huggingface_hub, one file at a time as tasks need them, and
read from there. With HF_HUB_OFFLINE=1 everything comes from a populated cache.
"""
from __future__ import annotations

import os
import re

from ..errors import StorageError
from .base import Storage, Writer, clean_key
from .local import LocalReader

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def cache_dir() -> str | None:
    """Read at call time (huggingface_hub reads its environment once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def parse_hf_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("hf://"):].strip("/")
    repo, _, revision = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise StorageError(f"{uri}: expected hf://org/name[@revision]")
    return repo, revision or "main"


class HubStorage(Storage):
    def __init__(self, repo: str, revision: str = "main"):
        self.repo = repo
        self.commit, self._files = self._resolve(repo, revision)
        self.revision = revision
        self.uri = f"hf://{repo}@{self.commit}"

    @staticmethod
    def _resolve(repo: str, revision: str) -> tuple[str, list[str]]:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        label = f"hf://{repo}@{revision}"
        try:
            if offline():
                # The cached snapshot: its folder name is the commit.
                path = snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=cache_dir())
                commit = os.path.basename(path.rstrip("/"))
                files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
                return commit, files
            info = HfApi().model_info(repo, revision=revision)
            return info.sha, sorted(s.rfilename for s in info.siblings or [])
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise StorageError(f"{label}: no such repository or revision (or no access: set HF_TOKEN)") from None
        except LocalEntryNotFoundError:
            raise StorageError(f"{label}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
        except HfHubHTTPError as exc:
            raise StorageError(f"{label}: the Hub refused the request ({exc.response.status_code if exc.response is not None else exc})") from None
        except OSError as exc:
            raise StorageError(f"{label}: cannot reach the Hub ({exc})") from None

    def _local(self, key: str) -> str:
        from huggingface_hub import hf_hub_download

        key = clean_key(key)
        if key not in self._files:
            raise StorageError(f"{self.describe(key)}: not in the repository")
        try:
            return hf_hub_download(self.repo, key, revision=self.commit, cache_dir=cache_dir(),
                                   local_files_only=offline())
        except Exception as exc:  # noqa: BLE001 - hub errors are many; one message
            raise StorageError(f"{self.describe(key)}: download failed ({type(exc).__name__}: {exc})") from None

    def open_reader(self, key: str) -> LocalReader:
        return LocalReader(self._local(key), self.describe(key))

    def exists(self, key: str) -> bool:
        return clean_key(key) in self._files

    def size(self, key: str) -> int:
        return os.path.getsize(self._local(key))

    def version(self, key: str) -> str:
        return f"commit={self.commit}"  # a commit fixes every file in it

    def list(self, prefix: str = "") -> list[str]:
        base = clean_key(prefix) + "/" if prefix else ""
        return [f for f in self._files if f.startswith(base)]

    def open_writer(self, key: str, size_hint: int | None = None, if_absent: bool = False) -> Writer:
        raise StorageError(f"{self.describe(key)}: hf:// locations are read-only sources; write to a local path or s3://")

    def delete(self, key: str) -> None:
        raise StorageError(f"{self.describe(key)}: hf:// locations are read-only")

    def location(self) -> tuple[str, ...]:
        return ("hf", *self.repo.split("/"), self.commit)  # two revisions of one repository are two models

    def child(self, prefix: str) -> "Storage":
        raise StorageError(f"{self.uri}: sub-folders of hub repositories are not supported as model folders")
