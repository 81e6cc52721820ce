"""A storage location by URI: local paths, s3://bucket/prefix, hf://org/name[@revision] (read-only)."""
from __future__ import annotations

from ..errors import StorageError
from .base import Storage
from .local import LocalStorage


def open_storage(uri: str) -> Storage:
    """The storage rooted at `uri`."""
    if uri.startswith("s3://"):
        from .s3 import S3Storage, parse_s3_uri

        return S3Storage(*parse_s3_uri(uri))
    if uri.startswith("hf://"):
        from .hub import HubStorage, parse_hf_uri

        return HubStorage(*parse_hf_uri(uri))
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme (use a local path, s3://bucket/prefix or hf://org/name)")
    return LocalStorage(uri)
