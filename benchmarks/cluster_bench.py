"""expo-ray on a simulated multi-node autoscaling cluster: where shard tasks ran, and how long an
evaluation waits before its first generation, split into autoscaler scale-up and engine start.

The cluster is the one the tests use (tests/autoscaling_cluster.py: Ray's real autoscaler with
its fake multi-node provider; a head without work, two 1-CPU workers, a 2-GPU worker type with
fake GPUs at min_workers 0). A float32 tiny pair and a tiny reward model are built here. Then:

1. ``expo-ray extrapolate`` (alphas 0.5 and 1, ``--chunk-mib 1``): shard tasks per node, from
   Ray's state API (``ray list tasks``), and the wall time.
2. ``expo-ray evaluate --tp 2 --gpu`` with no GPU node alive. Times from the command's start:
   the GPU node registering (its ``start_time_ms`` in ``ray list nodes``: everything before it is
   the CLI's start, the placement decision and the autoscaler's scale-up), the first model's
   generations written (node up -> engine started, model loaded, prompts generated), and the end.

The simulated nodes are processes on this machine, so "scale-up" here is the autoscaler's
reaction and a raylet's start, not a cloud VM's boot (minutes on EC2). Run by hand (prints markdown):

    .venv/bin/python benchmarks/cluster_bench.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
BIN = Path(sys.executable).parent
NODE_TYPES = {
    "cpu": {"resources": {"CPU": 1}, "min_workers": 2, "max_workers": 2},
    "gpu": {"resources": {"CPU": 2, "GPU": 2}, "min_workers": 0, "max_workers": 1},
}


def expo(cluster, *args, env=None):
    began = time.time()
    run = subprocess.run([str(BIN / "expo-ray"), *args], env={**cluster.env(), **(env or {})},
                         capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        sys.exit(f"expo-ray {args[0]} failed:\n{run.stderr[-3000:]}")
    return began, time.time()


def _seconds(value) -> float:
    """A node's start time from `ray list nodes --detail`: milliseconds, or a formatted date."""
    try:
        return float(value) / 1000
    except ValueError:
        return datetime.fromisoformat(str(value)).timestamp()


def main() -> None:
    from autoscaling_cluster import AutoscalingCluster

    from expo_ray.demo.tiny import build_tiny_pair
    from expo_ray.demo.tiny_reward import build_tiny_reward_model

    root = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    sft, aligned = build_tiny_pair(root / "pair", dtype="float32")
    reward = build_tiny_reward_model(root / "rm")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "instruction": t}) for i, t in enumerate(
        ["Say hello.", "Name a color.", "What is two plus two?", "Give advice."])))
    load = os.getloadavg()[0]
    cluster = AutoscalingCluster.started(NODE_TYPES)
    try:
        began = time.time()
        while len([n for n in cluster.ray_list("nodes", "state=ALIVE")]) < 3 and time.time() - began < 300:
            time.sleep(1)
        cluster_up = time.time() - began
        t0, t1 = expo(cluster, "extrapolate", "--sft", str(sft), "--aligned", str(aligned), "--alpha", "0.5,1",
                      "--out", str(root / "variants"), "--chunk-mib", "1", "--no-progress")
        tasks = [t for t in cluster.ray_list("tasks") if t["name"].startswith("extrapolate:")]
        per_node = Counter(t["node_id"][-5:] for t in tasks if t["state"] == "FINISHED")
        assert not [n for n in cluster.ray_list("nodes", "state=ALIVE") if n["resources_total"].get("GPU")]
        e0, e1 = expo(cluster, "evaluate", "--variants", str(root / "variants"), "--prompts", str(prompts),
                      "--reward-model", str(reward), "--tp", "2", "--gpu", "--eval-out", str(root / "eval"),
                      "--dtype", "float32", "--max-model-len", "256", "--max-tokens", "8", "--temperature", "0")
        gpu_node = min((n for n in cluster.ray_list("nodes", detail=True) if n["resources_total"].get("GPU")),
                       key=lambda n: n["start_time_ms"])
        node_up = _seconds(gpu_node["start_time_ms"])
        first_gen = min(p.stat().st_mtime for p in (root / "eval" / "cache").glob("generations-*.json"))
    finally:
        cluster.stop()
    print(f"# expo-ray on a simulated autoscaling cluster ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} cores, load average {load:.1f} at start)\n")
    print(f"cluster (head + 2 CPU workers) up in {cluster_up:.1f} s\n")
    print("| step | seconds |\n|---|---:|")
    print(f"| extrapolate: {len(tasks)} shard tasks, 2 alphas | {t1 - t0:.1f} |")
    print(f"| evaluate start -> GPU node registered (CLI start, placement, autoscaler scale-up) | {node_up - e0:.1f} |")
    print(f"| GPU node registered -> first model's generations written (engine start, load, generate) "
          f"| {first_gen - node_up:.1f} |")
    print(f"| evaluate start -> first generation | {first_gen - e0:.1f} |")
    print(f"| evaluate total (2 models, reward engine, report) | {e1 - e0:.1f} |\n")
    print("shard tasks per node: " + ", ".join(f"node ...{n}: {c}" for n, c in sorted(per_node.items())))


if __name__ == "__main__":
    main()
