"""Where a run may write, checked before Ray starts: never over an input model, never to a
read-only location, and only where a write actually succeeds."""
from __future__ import annotations

import uuid

from ..errors import ExpoError
from ..storage import Storage, open_storage


def _inside(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    return inner[:len(outer)] == outer


def check_no_overlap(out: Storage, inputs: dict[str, str]) -> None:
    """Refuse a destination that is, contains or lies inside an input model folder.

    `inputs` maps a role ("sft", "aligned") to the input's URI. Locations are compared resolved
    (links followed, bucket/prefix normalised), so no spelling of a path gets around it."""
    where = out.location()
    for role, uri in inputs.items():
        if uri.startswith("hf://"):
            continue  # read-only hub repositories cannot be a destination
        source = open_storage(uri).location()
        if where == source:
            relation = "is"
        elif _inside(source, where):
            relation = "contains"
        elif _inside(where, source):
            relation = "lies inside"
        else:
            continue
        raise ExpoError(f"{out.describe()}: the destination {relation} the {role} model folder {uri}; "
                        "writing there would overwrite or mix with the input; choose another destination")


def _check_writable(out_uri: str) -> Storage:
    """The destination's storage, after a small write and delete proved it writable (hf:// is
    refused by check_destination, before this is reached)."""
    store = open_storage(out_uri)
    probe = f".expo-ray/write-probe-{uuid.uuid4().hex[:8]}"
    try:
        store.write_bytes(probe, b"ok")
        store.delete(probe)
    except ExpoError as exc:
        raise ExpoError(f"destination {out_uri} is not writable: {exc}") from None
    return store


def check_destination(out_uri: str, inputs: dict[str, str] | None = None) -> Storage:
    """Everything about the destination that can be known before any work: read-only scheme,
    overlap with the inputs, writability."""
    if out_uri.startswith("hf://"):
        raise ExpoError(f"{out_uri}: hf:// locations are read-only sources; write to a local path or s3://")
    if inputs:
        check_no_overlap(open_storage(out_uri), inputs)
    return _check_writable(out_uri)
