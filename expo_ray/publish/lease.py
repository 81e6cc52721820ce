"""Who may write a variant folder: one lease per folder, created if absent, held while a run writes.

A run takes the lease of every variant folder it will write before it writes anything there,
so two runs of different jobs (other inputs, alpha rules or layouts) never write one folder at
the same time: the second is refused at once, having written nothing, and no folder can end up
holding a mix of two runs' files. Runs of the same job (the same variant fingerprint) write the
same bytes: a second one joins the holder's lease, and the manifest, created if absent, is
written once.

Leases live under DST/.expo-ray/leases/VARIANT/, one file per generation (00000001.json, ...);
the highest generation is the lease. A lease whose holder is gone (the same host and its
process is dead, or no renewal for EXPO_RAY_LEASE_S seconds, default 600, from another host) or
that its holder released after failing is taken over by creating the next generation, if
absent: of two runs taking over one stale lease, one wins. The files the stale lease's run may
have written are then leftovers the new holder removes (see :func:`settle_folder`). The holder
renews its lease every fifth of that time, and checks before it commits that it still holds it;
a run that lost its lease (stopped for longer than that) removes the files it wrote itself and
commits nothing.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..checkpoint.folder import MANIFEST_FILE
from ..checkpoint.safetensors_io import read_header
from ..errors import AlreadyExists, ExpoError, StorageError
from ..storage import Storage
from ..storage.local import HOST_TAG

log = logging.getLogger("expo_ray")

LEASES = ".expo-ray/leases"
FORMAT = "expo-ray.lease/1"
OUTPUT_MARK = "expo_ray.alpha"  # header metadata every output shard of expo-ray carries


def lease_seconds() -> float:
    return float(os.environ.get("EXPO_RAY_LEASE_S", "600"))


def _now() -> float:
    return time.time()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


@dataclass
class Lease:
    """This run's standing in one variant folder: the holder of its lease, or a run of the same
    job that joined the holder's."""

    out: Storage
    variant: str
    fingerprint: str
    files: list[str]                       # what this run may write into the folder
    run: str = field(default_factory=lambda: uuid.uuid4().hex)
    generation: int = 0                    # the generation this run holds (0: joined)
    leftovers: list[str] = field(default_factory=list)  # files a taken-over lease's run may have written

    @property
    def held(self) -> bool:
        return self.generation > 0

    def key(self, generation: int | None = None) -> str:
        return f"{LEASES}/{self.variant}/{generation or self.generation:08d}.json"

    def _record(self, released: bool = False) -> bytes:
        return json.dumps({"format": FORMAT, "variant": self.variant, "fingerprint": self.fingerprint,
                           "host": HOST_TAG, "pid": os.getpid(), "run": self.run, "renewed": _now(),
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "released": released, "files": self.files}, indent=1).encode()

    def renew(self) -> bool:
        """Rewrite the lease's renewal time; False if another run took it over meanwhile."""
        if not self.held or current(self.out, self.variant)[0] != self.generation:
            return False
        self.out.write_bytes(self.key(), self._record())
        return True

    def confirm(self) -> None:
        """Before a commit: this run still holds the lease, or (joined) the lease is its job's."""
        generation, record = current(self.out, self.variant)
        if self.held and generation == self.generation:
            return
        if not self.held and (record is None or record.get("fingerprint") == self.fingerprint):
            return
        raise LeaseLost(f"{self.out.describe(self.variant)}: taken over by another run with other inputs or "
                        "settings while this run was writing it (this run was stopped for longer than the "
                        f"{lease_seconds():g}-second lease); nothing of this run was committed there")

    def release(self, committed: bool) -> None:
        """Give the lease up: removed after a commit, marked released after a failure (its files
        list tells the next run what this one may have left)."""
        if not self.held:
            return
        try:
            if current(self.out, self.variant)[0] != self.generation:
                return
            if committed:
                for key in self.out.list(f"{LEASES}/{self.variant}"):
                    self.out.delete(key)
            else:
                self.out.write_bytes(self.key(), self._record(released=True))
        except ExpoError as exc:  # the outcome is decided; a stale lease expires on its own
            log.warning("%s: lease not released (%s)", self.out.describe(self.variant), exc)


class LeaseLost(ExpoError):
    """Another run took the lease of a variant folder over from this one."""


def current(out: Storage, variant: str) -> tuple[int, dict | None]:
    """The lease of `variant` (its generation and record), or (0, None)."""
    keys = [k for k in out.list(f"{LEASES}/{variant}") if k.rpartition("/")[2].removesuffix(".json").isdigit()]
    if not keys:
        return 0, None
    key = max(keys, key=lambda k: int(k.rpartition("/")[2].removesuffix(".json")))
    generation = int(key.rpartition("/")[2].removesuffix(".json"))
    try:
        record = json.loads(out.read_bytes(key, limit=64 * 1024 * 1024))
    except (ValueError, StorageError):
        record = {}
    return generation, record if isinstance(record, dict) else {}


def _stale(record: dict) -> bool:
    if record.get("format") != FORMAT or record.get("released"):
        return True
    if record.get("host") == HOST_TAG and isinstance(record.get("pid"), int) and not _alive(record["pid"]):
        return True
    renewed = record.get("renewed")
    return not isinstance(renewed, (int, float)) or _now() - renewed > lease_seconds()


def acquire(out: Storage, variant: str, fingerprint: str, files: list[str]) -> Lease:
    """This run's lease of `variant` (held, or joined for a run of the same job), or ExpoError
    when a live run of another job holds it."""
    lease = Lease(out, variant, fingerprint, sorted(files))
    for _ in range(5):
        generation, record = current(out, variant)
        if record is not None and not _stale(record):
            if record.get("fingerprint") == fingerprint:
                return lease  # the same job: the same bytes; the manifest is written once
            raise ExpoError(f"{out.describe(variant)}: another run with other inputs or settings is writing it; "
                            "nothing was written; wait for that run to finish or choose another --out (the lease of "
                            f"a run that is gone expires {lease_seconds():g} s after its last renewal)")
        lease.generation = generation + 1
        try:
            out.write_bytes(lease.key(), lease._record(), if_absent=True)
        except AlreadyExists:
            continue  # another run took it first: look again
        if record:
            lease.leftovers = [f for f in record.get("files", []) if isinstance(f, str)]
            log.info("%s: took over the lease of a run that is gone (generation %d)", out.describe(variant),
                     generation)
        return lease
    raise ExpoError(f"{out.describe(variant)}: its lease keeps changing hands; another run is starting there")


class Keeper:
    """Renews held leases in the background while a run writes."""

    def __init__(self, leases: list[Lease]):
        self.leases = [lease for lease in leases if lease.held]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="expo-lease", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(lease_seconds() / 5):
            for lease in self.leases:
                try:
                    if not lease.renew():
                        log.warning("%s: the lease was taken over by another run", lease.out.describe(lease.variant))
                except ExpoError as exc:  # storage hiccup: the next renewal may succeed
                    log.warning("%s: lease not renewed (%s)", lease.out.describe(lease.variant), exc)

    def __enter__(self) -> "Keeper":
        if self.leases:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)


def _expo_output(variant: Storage, key: str) -> bool:
    """Whether `key` is an output shard of expo-ray (its header carries the alpha it was made with)."""
    if not key.endswith(".safetensors"):
        return False
    try:
        return OUTPUT_MARK in read_header(variant, key).metadata
    except ExpoError:
        return False


def settle_folder(out: Storage, lease: Lease) -> int:
    """Make the variant folder hold nothing this run does not own: remove the leftovers of
    expo-ray runs (temp files of writers that are gone, output shards, the files of a lease taken
    over) and refuse anything else. Only what loaders read counts: files at the top of the folder
    whose names do not start with '.'; returns how many files were removed."""
    variant = out.child(lease.variant)
    removed = out.cleanup_incomplete(lease.variant)
    owned = set(lease.files) | {MANIFEST_FILE}
    for key in variant.list():
        if "/" in key or key.startswith(".") or key in owned:
            continue
        if key in lease.leftovers or _expo_output(variant, key):
            variant.delete(key)
            removed += 1
            continue
        raise ExpoError(f"{variant.describe(key)}: not written by expo-ray, and not part of this variant; a committed "
                        "folder holds exactly its manifest's files (loaders read every *.safetensors and *.json "
                        "there): move it away or choose another --out")
    if removed:
        log.info("%s: removed %d leftover file(s) of earlier runs", variant.describe(), removed)
    return removed


def remove_own(out: Storage, variant: str, records: list[dict], keep: set = frozenset()) -> None:
    """After losing a variant folder to another run: remove the output shards this run wrote there
    (those still the versions it wrote), except `keep` (files the other run's manifest lists)."""
    folder = out.child(variant)
    for record in records:
        written = record.get("files", {}).get(variant, {})
        key = record.get("shard")
        if key in keep or not written.get("version"):
            continue
        try:
            if folder.exists(key) and folder.version(key) == written["version"]:
                folder.delete(key)
        except ExpoError:
            pass
