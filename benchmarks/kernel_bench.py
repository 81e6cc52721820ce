#!/usr/bin/env python
"""Benchmark: the extrapolation arithmetic alone, ns per element per alpha.

Compares, on a synthetic DPO-like bf16 pair (SFT ~ N(0, 0.02), aligned = SFT + N(0, 0.001)):

* ``C kernel``: ``expo_ray.extrapolation.kernel`` C backend, all alphas in one call (correctly rounded);
* ``NumPy kernel``: the exact pure-NumPy fallback (correctly rounded);
* ``torch bf16``: ``a1 + alpha * (a1 - a0)`` in bf16 tensors, eager (every step rounds: NOT
  correctly rounded; what the ExPO paper's script does);
* ``torch f64 cast``: float64 arithmetic then ``.to(torch.bfloat16)``, chunked (torch casts
  float64 -> bf16 through float32, rounding twice: NOT correctly rounded).

The "wrong" column counts results that differ from the correctly rounded value (the C kernel's
result, itself checked against the NumPy kernel on a sample). Single thread unless
``--torch-threads`` says otherwise (the C and NumPy kernels are single-threaded).

Usage:
    .venv/bin/python benchmarks/kernel_bench.py
    .venv/bin/python benchmarks/kernel_bench.py --n 4M --alphas 0.1,0.5,25 --methods c,torch-bf16
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from expo_ray.extrapolation import kernel  # noqa: E402

CHUNK = 1 << 20  # elements per torch chunk (bounded temporaries, like the real pipeline)


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)


def cpu_info() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16") if x in flags]
    return f"{model}; {os.cpu_count()} logical CPUs; ISA: {', '.join(isa) or 'unknown'}"


def make_pair(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sft = torch.empty(n, dtype=torch.bfloat16)
    aligned = torch.empty(n, dtype=torch.bfloat16)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        x0 = rng.standard_normal(e - s, dtype=np.float32) * 0.02
        x1 = x0 + rng.standard_normal(e - s, dtype=np.float32) * 0.001
        sft[s:e] = torch.from_numpy(x0)
        aligned[s:e] = torch.from_numpy(x1)
    return aligned, sft


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def best_of(fn, repeat: int) -> tuple[float, float]:
    """Best wall-clock and best CPU time (of this thread) over `repeat` runs, in seconds."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    return min(wall), min(cpu)


def run_c(a1, a0, alphas, outs):
    kernel._c_extrapolate_into("BF16", a1, a0, alphas, outs)


def run_numpy(a1, a0, alphas, outs):
    kernel._numpy_extrapolate_into("BF16", a1, a0, alphas, outs)


def run_torch_bf16(t1, t0, alphas, outs):
    for s in range(0, len(t1), CHUNK):
        x1, x0 = t1[s:s + CHUNK], t0[s:s + CHUNK]
        d = x1 - x0
        for alpha, out in zip(alphas, outs):
            out[s:s + CHUNK] = x1 + alpha * d


def run_torch_f64(t1, t0, alphas, outs):
    for s in range(0, len(t1), CHUNK):
        x1, x0 = t1[s:s + CHUNK].double(), t0[s:s + CHUNK].double()
        d = x1 - x0
        for alpha, out in zip(alphas, outs):
            out[s:s + CHUNK] = (x1 + alpha * d).to(torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="16M", help="bf16 elements per input (16M; K/M/G suffixes)")
    ap.add_argument("--numpy-n", default="2M", help="elements for the (slow) NumPy kernel")
    ap.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the best is reported")
    ap.add_argument("--methods", default="c,numpy,torch-bf16,torch-f64")
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args(argv)

    n, n_np = parse_count(args.n), parse_count(args.numpy_n)
    alphas = [float(a) for a in args.alphas.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    torch.set_num_threads(args.torch_threads)

    print(f"# expo-ray kernel benchmark, {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- machine: {cpu_info()}; {platform.system()} {platform.release()}")
    print(f"- python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} thread(s))")
    c_info = kernel._ckernel.build_info() if kernel._ckernel is not None else "not built"
    print(f"- kernel backend in use: {kernel.backend()}; C kernel: {c_info}")
    print(f"- data: {n:,} bf16 elements per model (DPO-like: SFT ~ N(0, 0.02), delta ~ N(0, 0.001)), "
          f"alphas {alphas}, best of {args.repeat}")
    print()

    t1, t0 = make_pair(n)
    a1, a0 = bits(t1), bits(t0)
    exact = None
    if kernel._ckernel is not None:
        exact = [np.empty(n, dtype=np.uint16) for _ in alphas]
        run_c(a1, a0, alphas, exact)
        check = [np.empty(min(n, n_np), dtype=np.uint16) for _ in alphas]
        run_numpy(a1[:len(check[0])], a0[:len(check[0])], alphas, check)
        assert all(np.array_equal(c, e[:len(c)]) for c, e in zip(check, exact)), "C and NumPy kernels disagree"

    rows = []
    for method in methods:
        if method == "c":
            if kernel._ckernel is None:
                rows.append(("C kernel", None, None, "not built"))
                continue
            outs = [np.empty(n, dtype=np.uint16) for _ in alphas]
            before = kernel._ckernel.stats()
            secs = best_of(lambda: run_c(a1, a0, alphas, outs), args.repeat)
            after = kernel._ckernel.stats()
            done = after["element_alphas"] - before["element_alphas"]
            t2 = (after['tier2'] - before['tier2']) / done
            t3 = (after['tier3'] - before['tier3']) / done
            note = (f"exact; decided by tier 1 (vector float32 bound) {100 * (1 - t2 - t3):.2f}%, "
                    f"tier 2 (exact float64 test) {100 * t2:.2f}%, tier 3 (big integer) {100 * t3:.4f}%")
            rows.append(("C kernel", secs, n, outs, note))
        elif method == "numpy":
            m = min(n, n_np)
            outs = [np.empty(m, dtype=np.uint16) for _ in alphas]
            secs = best_of(lambda: run_numpy(a1[:m], a0[:m], alphas, outs), max(1, min(args.repeat, 2)))
            rows.append(("NumPy kernel", secs, m, outs, "exact"))
        elif method == "torch-bf16":
            outs = [torch.empty(n, dtype=torch.bfloat16) for _ in alphas]
            secs = best_of(lambda: run_torch_bf16(t1, t0, alphas, outs), args.repeat)
            rows.append(("torch bf16 arithmetic", secs, n, [bits(o) for o in outs],
                         "not correctly rounded"))
        elif method == "torch-f64":
            outs = [torch.empty(n, dtype=torch.bfloat16) for _ in alphas]
            secs = best_of(lambda: run_torch_f64(t1, t0, alphas, outs), args.repeat)
            rows.append(("torch float64 + cast", secs, n, [bits(o) for o in outs],
                         "float64 -> bf16 rounds twice"))
        else:
            raise SystemExit(f"unknown method {method!r}")

    print(f"- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(wall time suffers when other processes compete for the cores; CPU time much less)")
    print()
    print("| method | ns / element / alpha (wall) | ns / element / alpha (CPU) | elements | "
          "wrong (vs correctly rounded) | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        if row[1] is None:
            print(f"| {row[0]} | - | - | - | - | {row[3]} |")
            continue
        name, (wall, cpu), m, outs, note = row
        if exact is not None:
            wrong = sum(int(np.count_nonzero(o[:m] != e[:m])) for o, e in zip(outs, exact))
            wrong_s = f"{wrong:,} ({100 * wrong / (m * len(alphas)):.3f}%)"
        else:
            wrong_s = "n/a"
        scale = 1e9 / (m * len(alphas))
        print(f"| {name} | {wall * scale:.2f} | {cpu * scale:.2f} | {m:,} | {wrong_s} | {note} |")
    if "c" in methods and kernel._ckernel is not None:
        print()
        print("Per alpha, one alpha per call (the inputs' decoding is then not shared between alphas):")
        print()
        print("| alpha | ns / element (CPU) | tier 1 decides | tier 2 | tier 3 |")
        print("|---:|---:|---:|---:|---:|")
        out = [np.empty(n, dtype=np.uint16)]
        for alpha in alphas:
            before = kernel._ckernel.stats()
            _, cpu = best_of(lambda: run_c(a1, a0, [alpha], out), args.repeat)
            after = kernel._ckernel.stats()
            done = after["element_alphas"] - before["element_alphas"]
            t2 = (after["tier2"] - before["tier2"]) / done
            t3 = (after["tier3"] - before["tier3"]) / done
            print(f"| {alpha:g} | {cpu * 1e9 / n:.2f} | {100 * (1 - t2 - t3):.2f}% | {100 * t2:.2f}% | "
                  f"{100 * t3:.4f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
