"""Storage by URI: local paths, s3://bucket/prefix, hf://org/name[@revision] (read-only); input
folders pinned to the versions a plan read (:class:`Source`)."""
from __future__ import annotations

from .base import Reader, Storage, Writer, clean_key
from .local import LocalStorage
from .pinned import Source
from .uri import open_storage

__all__ = ["Reader", "Storage", "Writer", "clean_key", "open_storage", "LocalStorage", "Source"]
