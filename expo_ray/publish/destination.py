"""Where a run may write, checked before Ray starts: never over an input model (nor through a link
into one), never to a read-only location, and only where a write actually succeeds."""
from __future__ import annotations

import uuid
from pathlib import Path

from ..errors import ExpoError
from ..storage import Source, Storage, open_storage

BOOKKEEPING = ".expo-ray"  # receipts, leases and write probes, under the destination root


def _inside(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    return inner[:len(outer)] == outer


def _relation(where: tuple[str, ...], source: tuple[str, ...]) -> str | None:
    if where == source:
        return "is"
    if _inside(source, where):
        return "contains"
    if _inside(where, source):
        return "lies inside"
    return None


def _shown(location: tuple[str, ...]) -> str:
    if location[0] == "file":
        return str(Path(*location[1:]))
    return f"{location[0]}://" + "/".join(location[1:])


def _locations(inputs: dict) -> dict[str, tuple[tuple[str, ...], str]]:
    """Role -> (resolved location, URI) of each input (a Source, or a URI opened here)."""
    found = {}
    for role, source in inputs.items():
        if isinstance(source, str):
            if source.startswith("hf://"):
                continue  # read-only hub repositories cannot be a destination
            source = Source.open(source)
        found[role] = (source.location, source.uri)
    return found


def check_no_overlap(out: Storage, inputs: dict, folders: tuple[str, ...] = ()) -> None:
    """Refuse a destination that is, contains or lies inside an input model folder, and any of
    `folders` under it (the variant folders, the bookkeeping folder) that leads into an input or
    out of the destination through a link.

    `inputs` maps a role ("sft", "aligned") to the input: a :class:`~expo_ray.storage.Source`
    (its location resolved when it was opened) or a URI. Locations are compared resolved (links
    followed, bucket/prefix normalised), so no spelling of a path gets around it."""
    where = out.location()
    inputs = _locations(inputs)
    for role, (source, uri) in inputs.items():
        relation = _relation(where, source)
        if relation:
            raise ExpoError(f"{out.describe()}: the destination {relation} the {role} model folder {uri}; "
                            "writing there would overwrite or mix with the input; choose another destination")
    for folder in folders:
        real = out.resolve(folder)
        for role, (source, uri) in inputs.items():
            relation = _relation(real, source)
            if relation:
                target = "" if relation == "is" else f" (it leads to {_shown(real)})"
                raise ExpoError(f"{out.describe(folder)}: is a link into the {role} model folder {uri}{target}; "
                                "writing there would overwrite the input; remove the link or choose another "
                                "destination")
        if not _inside(real, where):
            raise ExpoError(f"{out.describe(folder)}: is a link to {_shown(real)}, outside the destination; refused "
                            "(expo-ray never writes through a link out of the destination)")


def _check_writable(store: Storage, out_uri: str) -> Storage:
    """The destination's storage, after a small write and delete proved it writable (hf:// is
    refused by check_destination, before this is reached)."""
    probe = f"{BOOKKEEPING}/write-probe-{uuid.uuid4().hex[:8]}"
    try:
        store.write_bytes(probe, b"ok")
        store.delete(probe)
    except ExpoError as exc:
        raise ExpoError(f"destination {out_uri} is not writable: {exc}") from None
    return store


def check_destination(out_uri: str, inputs: dict | None = None, folders: tuple[str, ...] = ()) -> Storage:
    """Everything about the destination that can be known before any work: read-only scheme,
    overlap with the inputs (of the root and of each of `folders` under it), writability."""
    if out_uri.startswith("hf://"):
        raise ExpoError(f"{out_uri}: hf:// locations are read-only sources; write to a local path or s3://")
    store = open_storage(out_uri)
    if inputs:
        check_no_overlap(store, inputs, (*folders, BOOKKEEPING))
    return _check_writable(store, out_uri)
