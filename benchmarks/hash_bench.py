#!/usr/bin/env python
"""Benchmark: content hashes of output files, GB/s on one core (data in memory).

* ``sha256``: hashlib (what Hub LFS pointers hold; expo-ray computes it only with ``--sha256``);
* ``blake3``: the blake3 package, one thread, the whole buffer at once;
* ``blake3 16 MiB tree``: expo-ray's default record (``expo_ray.checkpoint.hashing.RangeHash``: BLAKE3 of each
  16 MiB block, then of the concatenated digests), fed in 4 MiB writes as a task feeds it.

Rounds are interleaved (every method once per round) and the table gives the median and the best:
other processes on a shared machine slow whichever method runs at that moment.

    .venv/bin/python benchmarks/hash_bench.py --mib 512 --rounds 5
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from datetime import datetime, timezone

from blake3 import blake3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from expo_ray.checkpoint import hashing  # noqa: E402


def tree(data: memoryview) -> None:
    h = hashing.RangeHash(hashing.DEFAULT)
    for i in range(0, len(data), 4 << 20):
        h.update(data[i:i + (4 << 20)])
    hashing.combine(hashing.DEFAULT, [h.result()], len(data))


METHODS = {
    "sha256": lambda d: hashlib.sha256(d).digest(),
    "blake3": lambda d: blake3(d).digest(),
    "blake3 16 MiB tree (expo-ray default)": tree,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="buffer size in MiB")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    data = memoryview(os.urandom(args.mib << 20))
    cpu = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, fn in METHODS.items():
            t = time.thread_time()
            fn(data)
            cpu[name].append(time.thread_time() - t)
    print(f"# content hash benchmark, {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"- {args.mib} MiB in memory, {args.rounds} interleaved rounds, CPU time of the hashing thread; "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print("| method | GB/s per core (median) | GB/s (best) | vs sha256 (median) |")
    print("|---|---:|---:|---:|")
    base = len(data) / statistics.median(cpu["sha256"])
    for name, secs in cpu.items():
        med, best = len(data) / statistics.median(secs), len(data) / min(secs)
        print(f"| {name} | {med / 1e9:.2f} | {best / 1e9:.2f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
