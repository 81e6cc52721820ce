#!/usr/bin/env python
"""Benchmark: builds of the C kernel against each other, in interleaved rounds.

Each build is compiled here from a source file (this tree's ``expo_ray/extrapolation/_kernel.c``, or one from git,
e.g. ``git show main:expo_ray/extrapolation/_kernel.c > /tmp/main_kernel.c``) with optional extra compiler flags
(``-DEXPO_NO_CLONES -march=x86-64-v3`` builds the AVX2/FMA path alone, whatever the CPU offers).
Every round runs every build once, each in a fresh process, on the same synthetic DPO-like bf16
pair (16M elements, alphas 0.1-0.5 in one call); the table gives the median and best CPU time per
element per alpha. On a shared machine compare the builds inside one table only.

    .venv/bin/python benchmarks/kernel_builds_bench.py \\
        --build "main AVX2=/tmp/main_kernel.c:-DEXPO_NO_CLONES -march=x86-64-v3" \\
        --build "this AVX2=expo_ray/extrapolation/_kernel.c:-DEXPO_NO_CLONES -march=x86-64-v3" \\
        --build "main=/tmp/main_kernel.c" --build "this=expo_ray/extrapolation/_kernel.c"
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_FLAGS = ["-O3", "-std=c11", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared"]  # as setup.py

TIMED = r"""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from expo_ray import _kernel as k
n = 16 << 20
rng = np.random.default_rng(0)
x0 = rng.standard_normal(n, dtype=np.float32) * 0.02
x1 = x0 + rng.standard_normal(n, dtype=np.float32) * 0.001
bf16 = lambda x: ((x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) >> 16).astype(np.uint16)
a1, a0 = bf16(x1), bf16(x0)
alphas = [0.1, 0.2, 0.3, 0.4, 0.5]
outs = [np.ones(n, np.uint16) for _ in alphas]
best = 1e9
for _ in range(3):
    c = time.thread_time()
    k.extrapolate_into(0, a1, a0, alphas, outs)
    best = min(best, time.thread_time() - c)
print(best * 1e9 / (n * len(alphas)))
"""


def build(name: str, source: Path, flags: list[str], root: Path) -> Path:
    """Compile `source` into root/<i>/expo_ray/_kernel*.so; returns the folder to put on sys.path."""
    folder = root / str(len(list(root.iterdir())))
    (folder / "expo_ray").mkdir(parents=True)
    out = folder / "expo_ray" / ("_kernel" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["gcc", *BASE_FLAGS, *flags, f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(out)]
    subprocess.run(cmd, check=True)
    (folder / "expo_ray" / "__init__.py").write_text("")
    print(f"- {name}: {shlex.join(cmd[:-2])}", flush=True)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="append", required=True, metavar="NAME=SOURCE[:FLAGS]")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="expo-kernel-builds-"))
    try:
        builds = {}
        for spec in args.build:
            name, _, rest = spec.partition("=")
            source, _, flags = rest.partition(":")
            builds[name] = build(name, (REPO / source).resolve(), flags.split(), root)
        times = {name: [] for name in builds}
        for _ in range(args.rounds):
            for name, folder in builds.items():
                res = subprocess.run([sys.executable, "-c", TIMED, str(folder)], capture_output=True, text=True,
                                     check=True)
                times[name].append(float(res.stdout))
        print(f"- {args.rounds} interleaved rounds, 16M bf16 elements x 5 alphas, best of 3 calls per round, "
              f"CPU time; load average {os.getloadavg()[0]:.1f}")
        print()
        print("| build | ns / element / alpha (median) | best | per round |")
        print("|---|---:|---:|---|")
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
