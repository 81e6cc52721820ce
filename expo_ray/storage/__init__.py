"""Storage by URI: local paths now; s3:// and hf:// plug in behind the same interface."""
from __future__ import annotations

from ..errors import StorageError
from .base import Reader, Storage, Writer, clean_key
from .local import LocalStorage

__all__ = ["Reader", "Storage", "Writer", "clean_key", "open_storage", "LocalStorage"]


def open_storage(uri: str) -> Storage:
    """The storage rooted at `uri` (a local path or file:// URI)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: the {scheme}:// scheme is not supported yet (local paths only)")
    return LocalStorage(uri)
