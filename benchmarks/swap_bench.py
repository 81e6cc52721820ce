"""An alpha sweep on vLLM: hot-swapping weights in one engine vs materializing and restarting.

The same float32 tiny SFT/aligned pair (built here; size set by the flags), the same prompts and
greedy decoding with a fixed ``max_tokens`` for both methods:

(a) hot-swap: one ``GenerationEngine(aligned, swappable=True)``; for each alpha,
    ``swap_weights(extrapolated_source(sft, aligned, alpha))`` (every worker computes theta(alpha)
    from the two checkpoints), then generate. The wall time includes the engine's start and close.
(b) materialize-and-restart: ``expo_ray.api.extrapolate`` writes every alpha's variant folder (one
    call, all alphas, as ``expo-ray extrapolate --alphas ...`` does), then for each alpha a fresh
    ``GenerationEngine`` on its folder generates and is closed. The wall time includes the
    extrapolation, every engine start and close. Ray's own start-up (needed by (b) only) happens
    before the clock starts and is reported on its own line.

Per alpha it reports the swap time, the restart engine's start time, both generation times, and
whether (a) and (b) give the same token ids for every prompt ("same outputs"), and whether the
outputs differ from the first alpha's (so that "same" is not vacuous). Run by hand (prints markdown):

    .venv/bin/python benchmarks/swap_bench.py                          # tiny: 4 layers, hidden 64
    .venv/bin/python benchmarks/swap_bench.py --layers 8 --hidden 512 --heads 8 --kv-heads 2 --intermediate 1408
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0,0.5,1,2,4,8", help="comma-separated alphas of the sweep")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2, help="attention heads (head_dim = hidden / heads, at least 32)")
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 x hidden)")
    ap.add_argument("--delta-scale", type=float, default=0.3,
                    help="aligned = sft + delta_scale * rms(p) * N(0, 1): large enough that alphas change outputs")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed engine starts before the clock starts (the first start in a process can be slower)")
    ap.add_argument("--workdir", default=None,
                    help="where to build models and variants (default: a temporary folder, removed)")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    intermediate = args.intermediate or 2 * args.hidden

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import vllm  # noqa: F401 - imported before any clock starts, for both methods alike

    from expo_ray.api import extrapolate
    from expo_ray.cluster.ray_runtime import ensure_ray
    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine
    from expo_ray.evaluation.engine.weight_swap import extrapolated_source
    from expo_ray.options import SamplingOptions, variant_name

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="expo-swap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sft, aligned = build_tiny_pair(work / "pair", dtype="float32", delta_scale=args.delta_scale, seed=3,
                                   num_hidden_layers=args.layers, hidden_size=args.hidden,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   intermediate_size=intermediate)
    build_s = time.perf_counter() - t
    model_bytes = folder_bytes(aligned)
    prompts = [f"Question number {i}: tell me something about the number {i}." for i in range(args.prompts)]
    greedy = SamplingOptions.greedy(max_tokens=args.max_tokens)
    kwargs = {"dtype": "float32", "max_model_len": 512}

    def generate(engine):
        began = time.perf_counter()
        outs = engine.generate(prompts, greedy)
        return time.perf_counter() - began, [o.token_ids for o in outs], sum(o.token_count for o in outs)

    for _ in range(args.warmup):
        GenerationEngine(str(aligned), **kwargs).close()
    load_before = os.getloadavg()

    # (a) hot-swap
    swap_rows = {}
    began = time.perf_counter()
    engine = GenerationEngine(str(aligned), swappable=True, **kwargs)
    swap_engine_start = time.perf_counter() - began
    for alpha in alphas:
        t = time.perf_counter()
        report = engine.swap_weights(extrapolated_source(str(sft), str(aligned), alpha))
        swap_call = time.perf_counter() - t
        gen_s, ids, tokens = generate(engine)
        swap_rows[alpha] = {"swap_call": swap_call, "swap_worker": report["seconds"], "gen": gen_s, "ids": ids,
                            "tokens": tokens}
    t = time.perf_counter()
    engine.close()
    swap_close = time.perf_counter() - t
    hot_wall = time.perf_counter() - began

    # (b) materialize-and-restart
    t = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t
    out_dir = work / "variants"
    restart_rows = {}
    began = time.perf_counter()
    extrapolate(str(sft), str(aligned), alphas, str(out_dir), show_progress=False)
    extrapolate_s = time.perf_counter() - began
    for alpha in alphas:
        t = time.perf_counter()
        fresh = GenerationEngine(str(out_dir / variant_name(alpha)), **kwargs)
        start_s = time.perf_counter() - t
        gen_s, ids, tokens = generate(fresh)
        t = time.perf_counter()
        fresh.close()
        restart_rows[alpha] = {"start": start_s, "gen": gen_s, "ids": ids, "close": time.perf_counter() - t}
    restart_wall = time.perf_counter() - began

    import ray

    ray.shutdown()
    load_after = os.getloadavg()

    base = swap_rows[alphas[0]]["ids"]
    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores, {mem_gib():.1f} GiB RAM; "
          f"vLLM {vllm.__version__} (CPU, enforce_eager)")
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"model: tiny Llama, {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV), "
          f"MLP {intermediate}, vocab 384, float32, {model_bytes / 1e6:.1f} MB per checkpoint "
          f"(built in {build_s:.1f} s); "
          f"delta_scale {args.delta_scale}")
    print(f"sweep: {len(alphas)} alphas {', '.join(f'{a:g}' for a in alphas)}; {args.prompts} prompts, greedy, "
          f"max_tokens {args.max_tokens}; Ray start-up for (b), not counted: {ray_start:.1f} s; "
          f"{args.warmup} untimed warm-up engine start(s); load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after\n")

    print("| method | wall s | vs hot-swap | what it includes |")
    print("|---|---:|---:|---|")
    gen_a = sum(r["gen"] for r in swap_rows.values())
    gen_b = sum(r["gen"] for r in restart_rows.values())
    starts_b = sum(r["start"] for r in restart_rows.values())
    closes_b = sum(r["close"] for r in restart_rows.values())
    swaps = sum(r["swap_call"] for r in swap_rows.values())
    print(f"| (a) hot-swap, one engine | {hot_wall:.1f} | 1.00x | 1 engine start {swap_engine_start:.1f} s, "
          f"{len(alphas)} swaps {swaps:.2f} s, generation {gen_a:.1f} s, close {swap_close:.1f} s |")
    print(f"| (b) materialize + restart | {restart_wall:.1f} | {restart_wall / hot_wall:.2f}x | extrapolate "
          f"{len(alphas)} variants {extrapolate_s:.1f} s, {len(alphas)} engine starts {starts_b:.1f} s, "
          f"generation {gen_b:.1f} s, {len(alphas)} closes {closes_b:.1f} s |")

    print("\n| alpha | swap s (call) | swap s (worker) | (a) generate s | (b) engine start s | (b) generate s "
          f"| same outputs | differs from alpha {alphas[0]:g} |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for alpha in alphas:
        a, b = swap_rows[alpha], restart_rows[alpha]
        same = a["ids"] == b["ids"]
        differs = "-" if alpha == alphas[0] else ("yes" if a["ids"] != base else "no")
        n_same = sum(x == y for x, y in zip(a["ids"], b["ids"]))
        print(f"| {alpha:g} | {a['swap_call']:.3f} | {a['swap_worker']:.3f} | {a['gen']:.2f} | {b['start']:.1f} | "
              f"{b['gen']:.2f} | {'yes' if same else f'NO ({n_same}/{len(prompts)})'} | {differs} |")
    print(f"\nswap vs engine start (mean): {swaps / len(alphas):.3f} s vs {starts_b / len(alphas):.1f} s; "
          f"hot-swap sweep {restart_wall / hot_wall:.1f}x faster end to end")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
