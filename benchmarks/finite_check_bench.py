"""What the NaN/Inf and overflow check costs next to the kernel, per chunk of a shard task.

    .venv/bin/python benchmarks/finite_check_bench.py [--elements 16777216] [--alphas 0.1,0.2,0.3,0.4,0.5] [--rounds 7]

Times, on one chunk of random bf16 weights, the correctly rounded kernel (all alphas) and
`expo_ray.extrapolation.finite.check_chunk` (both inputs' largest magnitudes; outputs are scanned only when that
bound nears the dtype's range, which it never does here), interleaved, and prints the median and
minimum of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from expo_ray.extrapolation import kernel
from expo_ray.extrapolation.finite import check_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    n = args.elements
    rng = np.random.default_rng(0)
    to_bf16 = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    sft = to_bf16(rng.standard_normal(n, dtype=np.float32) * 0.02)
    aligned = to_bf16((sft.astype(np.uint32) << 16).view(np.float32) + rng.standard_normal(n, dtype=np.float32) * 1e-3)
    a_bytes, s_bytes = aligned.tobytes(), sft.tobytes()
    outs = [np.empty(n, np.uint16) for _ in alphas]
    kernel_s, check_s = [], []
    for _ in range(args.rounds):
        began = time.perf_counter()
        kernel.extrapolate_into("BF16", aligned, sft, alphas, outs)
        kernel_s.append(time.perf_counter() - began)
        began = time.perf_counter()
        check_chunk("bench", "BF16", a_bytes, s_bytes, alphas, [repr(a) for a in alphas], outs, False)
        check_s.append(time.perf_counter() - began)
    per = lambda s: s / n * 1e9  # noqa: E731
    print(f"{n:,} bf16 elements x {len(alphas)} alphas, {args.rounds} interleaved rounds "
          f"(kernel: {kernel.backend()})\n")
    print("| step | median ns/element | min ns/element | median, share of the kernel |")
    print("|---|---:|---:|---:|")
    for label, times in (("kernel (all alphas)", kernel_s), ("finite check", check_s)):
        share = statistics.median(times) / statistics.median(kernel_s)
        print(f"| {label} | {per(statistics.median(times)):.2f} | {per(min(times)):.2f} | {share:.1%} |")


if __name__ == "__main__":
    main()
