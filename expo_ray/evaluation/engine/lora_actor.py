"""A Ray actor holding one :class:`~.multi_lora.MultiLoraEngine`: the SFT model with every alpha's
adapter as a LoRA, all generated in one batch.

Adapters are local folders on the engine's node: local paths as they are, s3:// copied into the
model cache, hf:// fetched (only the adapter's files). During a search the actor writes the
adapter of each alpha the search asks for itself (:func:`expo_ray.lora.scale.write_adapter_variant`:
a scaled config, and the whole tensors extrapolated), next to the engine, without storage writes.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from ...cluster.ray_runtime import task_options
from ...options import EngineOptions, SamplingOptions
from ..models import local_copy, release_copy
from .actors import EngineLog, _engine_kwargs, _EngineActor, _remote_class, _sampling
from .multi_lora import MultiLoraEngine

ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "tokenizer*", "*.jinja", "*.json"]


def local_adapter(uri: str, identity: str | None) -> str:
    """A local folder holding the adapter at ``uri`` (see :func:`~..models.local_copy`)."""
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        from ...storage.hub import cache_dir, endpoint, offline, parse_hf_uri

        repo, revision = parse_hf_uri(uri)
        return snapshot_download(repo, revision=revision, cache_dir=cache_dir(), local_files_only=offline(),
                                 allow_patterns=ADAPTER_PATTERNS, endpoint=endpoint())
    return local_copy(uri, identity) if identity and "://" in uri else uri.removeprefix("file://")


class MultiLoraActor(_EngineActor):
    """The base model's engine with named adapters; :meth:`generate_many` answers for each in one batch.

    ``adapters``: name -> (uri, identity) added at start-up (each checked by vLLM; a refusal fails
    the start in one line). ``max_rank``/``slots``/``cached`` size the LoRA buffers.
    """

    def __init__(self, base_uri: str, base_identity: str | None, adapters: dict[str, tuple[str, str | None]], *,
                 max_rank: int, slots: int, cached: int = 0, log_uri: str | None = None,
                 **engine_kwargs: Any) -> None:
        self.log = EngineLog(log_uri)
        self.model_path = local_copy(base_uri, base_identity) if base_identity else str(base_uri)
        self.copies: list[str] = []
        self.written: dict[float, str] = {}
        self.sources: dict[str, str] = {}
        self.scratch = tempfile.mkdtemp(prefix="expo-ray-lora-")
        began = time.perf_counter()
        self.engine = MultiLoraEngine(self.model_path, max_rank=max_rank, slots=slots,
                                      cached=max(cached, len(adapters)), **engine_kwargs)
        self.startup_s = round(time.perf_counter() - began, 2)
        for name, (uri, identity) in adapters.items():
            self.add(name, uri, identity)

    def add(self, name: str, uri: str, identity: str | None = None) -> None:
        """Add the adapter at ``uri`` under ``name`` (a no-op for a name already added)."""
        path = local_adapter(uri, identity)
        if path != uri:
            self.copies.append(path)
        self.engine.add_adapter(name, path)

    def add_alpha(self, name: str, adapter_uri: str, alpha: float, plan: dict | None = None) -> dict:
        """Write the adapter variant for ``alpha`` of the adapter at ``adapter_uri`` on the base
        model on this node, and add it under ``name``; returns the seconds that took."""
        from ...lora.plan import adapter_identity
        from ...lora.scale import write_adapter_variant
        from ...options import PlanOptions

        began = time.perf_counter()
        if alpha not in self.written:
            if adapter_uri not in self.sources:
                remote = "://" in adapter_uri and not adapter_uri.startswith("file://")
                identity = adapter_identity(adapter_uri) if remote else None
                self.sources[adapter_uri] = local_adapter(adapter_uri, identity)
            self.written[alpha] = write_adapter_variant(self.model_path, self.sources[adapter_uri], alpha,
                                                        f"{self.scratch}/{name}", PlanOptions.from_dict(plan))
        self.engine.add_adapter(name, self.written[alpha])
        return {"seconds": round(time.perf_counter() - began, 3)}

    def generate_many(self, jobs: dict[str, tuple[str | None, list[str]]],
                      sampling: SamplingOptions | dict | None = None) -> dict[str, list[dict]]:
        """{label: answers} for ``jobs`` (label -> (adapter name or None for the base, prompts))."""
        began = time.perf_counter()
        out = self.engine.generate_many(jobs, _sampling(sampling))
        self.generate_s = round(time.perf_counter() - began, 2)
        return {label: [{"output": g.text, "tokens": g.token_count, "finish_reason": g.finish_reason} for g in gens]
                for label, gens in out.items()}

    def generate_full(self, jobs: dict[str, tuple[str | None, list[str]]],
                      sampling: SamplingOptions | dict | None = None) -> dict[str, list[dict]]:
        """Like :meth:`generate_many`, with the generated token ids as well."""
        out = self.engine.generate_many(jobs, _sampling(sampling))
        return {label: [{"text": g.text, "token_ids": list(g.token_ids)} for g in gens] for label, gens in out.items()}

    def close(self) -> None:
        super().close()
        for path in self.copies:
            release_copy(path)
        self.copies = []
        shutil.rmtree(self.scratch, ignore_errors=True)


def multi_lora_actor():
    """``ray.remote(MultiLoraActor)``."""
    return _remote_class(MultiLoraActor)


def start_multi_lora_actor(base_uri: str, base_identity: str | None, adapters: dict, engine: EngineOptions,
                           placement, *, max_rank: int, slots: int, cached: int = 0, log_uri: str | None = None):
    """A multi-LoRA generation actor on ``placement`` with the engine options' context length and
    chat template."""
    template = {"chat_template": engine.chat_template} if engine.chat_template else {}
    return multi_lora_actor().options(**task_options(**placement.actor_options)).remote(
        base_uri, base_identity, adapters, max_rank=max_rank, slots=slots, cached=cached, log_uri=log_uri,
        max_model_len=engine.max_model_len, **_engine_kwargs(placement, engine), **template)


def start_multi_lora(engines, base_uri: str, base_identity: str | None, adapters: dict, *, max_rank: int, slots: int,
                     cached: int = 0, label: str = ""):
    """A multi-LoRA generation actor among ``engines`` (an :class:`~.actors.Engines`)."""
    return engines.start("generation", label or base_uri, lambda log_uri: start_multi_lora_actor(
        base_uri, base_identity, adapters, engines.engine, engines.placement.generation, max_rank=max_rank,
        slots=slots, cached=cached, log_uri=log_uri))
