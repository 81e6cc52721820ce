"""theta(alpha) with expo_ray.extrapolation.kernel_torch (torch float64 ops, on a GPU when there is one) against
the C kernel: same result bits, and time per element.

DPO-like bf16 weights (aligned = sft + a small relative change), one alpha. Prints a markdown
table; exits 1 if any bit differs. Needs only torch and numpy (and expo_ray on the path), so it
can run on a machine without vLLM or Ray:

    python benchmarks/kernel_torch_bench.py --elements 67108864 --device cuda
    python benchmarks/kernel_torch_bench.py --elements 4194304 --device cpu
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from expo_ray.extrapolation import kernel, kernel_torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sft = rng.standard_normal(args.elements, dtype=np.float32) * 0.02
    aligned = sft + rng.standard_normal(args.elements, dtype=np.float32) * 0.0005
    to_bits = lambda x: torch.from_numpy(x).to(torch.bfloat16).view(torch.int16)  # noqa: E731
    a_bits, s_bits = to_bits(aligned), to_bits(sft)

    began = time.perf_counter()
    (want,) = kernel.extrapolate("BF16", a_bits.numpy().view(np.uint16), s_bits.numpy().view(np.uint16), [args.alpha])
    c_s = time.perf_counter() - began

    device = torch.device(args.device)
    a_dev, s_dev = a_bits.to(device), s_bits.to(device)
    best = float("inf")
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        got = kernel_torch.extrapolate("BF16", a_dev, s_dev, args.alpha)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    differ = int((got.cpu().numpy().view(np.uint16) != want).sum())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print("| method | device | elements | seconds | ns per element | bits differing from the C kernel |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| C kernel (`expo_ray.extrapolation.kernel`) | CPU, 1 thread | {args.elements:,} | {c_s:.3f} | "
          f"{c_s / args.elements * 1e9:.2f} | - |")
    print(f"| torch (`expo_ray.extrapolation.kernel_torch`), best of {args.repeat} | {name} | {args.elements:,} | "
          f"{best:.3f} | "
          f"{best / args.elements * 1e9:.2f} | {differ} |")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
