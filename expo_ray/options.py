"""The options of each concern, each the one home of its defaults.

- :class:`PlanOptions`: how a pair is extrapolated (alpha rules and policies);
- :class:`WriteOptions`: how variants are written (memory per task, hashes);
- :class:`PromptOptions`: which prompts an evaluation uses;
- :class:`EngineOptions`: the vLLM engines and where they run;
- :class:`SamplingOptions`: how answers are sampled (the ExPO paper's defaults);
- :class:`SearchOptions`: the adaptive alpha search.

Each is a frozen dataclass whose fields carry their command-line flag, so the same object gives
the click options (:func:`click_options`, defaults shown from the fields), is built from a
command's parameters (:meth:`from_params`), is read from a sweep spec by
:mod:`expo_ray.sweep.spec` (the fields' ``spec`` keys) and travels as a plain dict through Ray
and ``collective_rpc`` (:meth:`to_dict` / :meth:`from_dict`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import click

from .errors import PlanError

ALPHA_RULE = "Every alpha >= 0 (0 is the aligned model; negative values are refused, here and in sweeps)."
DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_SEARCH_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)


# Alphas: how they are read from text and how they are named.


def format_alpha(alpha: float) -> str:
    return repr(float(alpha) + 0.0)  # + 0.0: -0.0 is 0.0, one variant


def variant_name(alpha: float) -> str:
    """The folder name of the variant for `alpha` (e.g. alpha_0.3)."""
    return f"alpha_{format_alpha(alpha)}"


def finite_number(text: str, what: str, negative_ok: bool = True) -> float:
    """``text`` as a finite float64 (one PlanError naming ``what`` otherwise); ``-0`` is 0."""
    try:
        value = float(text) + 0.0
    except ValueError:
        raise PlanError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise PlanError(f"{what}: {text!r} is not a finite number")
    mantissa = text.strip().lower().split("e")[0]
    if value == 0 and any(c in "123456789" for c in mantissa):
        raise PlanError(f"{what}: {text!r} rounds to 0 as a float64; write 0 or a larger value")
    if value < 0 and not negative_ok:
        raise PlanError(f"{what}: {text!r} is negative; alphas and scale factors are >= 0 "
                        "(alpha 0 is the aligned model itself)")
    return value


def parse_alphas(text: str) -> tuple[float, ...]:
    """'0.1,0.3,0.5' -> (0.1, 0.3, 0.5); refuses empty, negative, non-finite and repeated values."""
    values = [finite_number(p.strip(), f"alpha list {text!r}", negative_ok=False) for p in text.split(",") if p.strip()]
    if not values:
        raise PlanError("the alpha list is empty")
    if len(set(values)) != len(values):
        raise PlanError(f"alpha list {text!r} repeats a value")
    return tuple(values)


def _option(value, *decls: str, help: str, spec: str | None = None, **click_kwargs):
    """A field with its default ``value``, its command-line flag (``decls``; ``click_kwargs`` for
    click.option) and, with ``spec``, its sweep-spec key."""
    metadata = {"decls": decls, "help": help, "click": click_kwargs, "spec": spec}
    if value is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=value, metadata=metadata)


class _Options:
    """What every options object has: its flags, its spec keys, a plain-dict form."""

    @classmethod
    def flags(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("decls")]

    @classmethod
    def spec_keys(cls) -> dict[str, dataclasses.Field]:
        """Sweep-spec key -> field, for the fields a spec may set."""
        return {f.metadata["spec"]: f for f in dataclasses.fields(cls) if f.metadata.get("spec")}

    @classmethod
    def from_params(cls, params: dict, **overrides):
        """The object from a click command's parameters; removes its own from ``params``. Values the
        object refuses together (e.g. ``--top-p 0``) are a usage error."""
        values = {}
        for f in cls.flags():
            if f.name in params:
                value = params.pop(f.name)
                values[f.name] = tuple(value) if isinstance(value, (list, tuple)) else value
        try:
            return cls(**{**values, **overrides})
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None):
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def click_options(*classes: type[_Options], skip: Sequence[str] = ()):
    """A decorator adding the flags of ``classes`` (in order) to a click command, less ``skip``."""
    def decorate(f):
        for cls in reversed(classes):
            for fl in reversed(cls.flags()):
                if fl.name in skip:
                    continue
                kwargs = dict(fl.metadata["click"])
                if fl.default is dataclasses.MISSING:
                    kwargs["required"] = True
                else:
                    kwargs.setdefault("default", fl.default)
                    shown = not (fl.default is None or fl.default is False or fl.default == ())
                    kwargs.setdefault("show_default", shown)
                f = click.option(*fl.metadata["decls"], fl.name, help=fl.metadata["help"], **kwargs)(f)
        return f
    return decorate


# ---------------------------------------------------------------------------------------------
# Extrapolation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanOptions(_Options):
    """Alpha rules and policies of one pair (what :func:`expo_ray.extrapolation.plan.make_plan` takes)."""

    scales: tuple[str, ...] = _option(
        (), "--scale", multiple=True, metavar="PATTERN=FACTOR",
        help="Scale alpha for tensors whose name matches PATTERN (a glob, or re:REGEX). Repeatable; the first "
             "match wins.")
    layer_scales: str | None = _option(
        None, "--layer-scales", metavar="EARLY,MIDDLE,LATE",
        help="Scale alpha per third of the decoder layers, e.g. 0.5,1,1.5.")
    exclude: tuple[str, ...] = _option(
        (), "--exclude", multiple=True, metavar="PATTERN",
        help="Copy tensors matching PATTERN unchanged from the aligned model. Repeatable.")
    copy_unmatched: bool = _option(
        False, "--copy-unmatched", is_flag=True, spec="copy_unmatched",
        help="Copy tensors that only the aligned model has (default: error).")
    allow_added_rows: bool = _option(
        False, "--allow-added-rows", is_flag=True, spec="allow_added_rows",
        help="Aligned embeddings/lm_head may have extra vocabulary rows: extrapolate the shared rows, copy the "
             "new ones (default: error).")
    allow_nonfinite: bool = _option(
        False, "--allow-nonfinite", is_flag=True, spec="allow_nonfinite",
        help="Inputs may hold NaN/Inf; they stay non-finite in the outputs (default: error). An alpha that "
             "overflows finite weights into Inf is always an error.")

    merge: bool | None = _option(
        None, "--merge/--adapter-variants", spec="merge",
        help="For an aligned model that is a PEFT LoRA adapter: write full model folders (theta_sft + (1 + alpha) "
             "* s * B @ A), or one adapter per alpha (the default; evaluated with every alpha in one multi-LoRA "
             "engine). Full checkpoints always give full folders.")

    def policies(self) -> dict[str, bool]:
        """The policies (what is allowed), apart from the alpha rules: part of every variant's
        fingerprint and of its manifest's plan summary."""
        return {"copy_unmatched": self.copy_unmatched, "allow_added_rows": self.allow_added_rows,
                "allow_nonfinite": self.allow_nonfinite}


@dataclass(frozen=True)
class WriteOptions(_Options):
    """How variants are written."""

    chunk_mib: float = _option(
        256, "--chunk-mib", type=click.FloatRange(0, 65536, min_open=True), spec="chunk_mib",
        help="Working-memory budget per task in MiB (bounds memory whatever the tensor sizes).")
    sha256: bool = _option(
        False, "--sha256", is_flag=True, spec="sha256",
        help="Also record every file's sha256 (what Hub LFS pointers hold); BLAKE3 is always recorded.")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptOptions(_Options):
    """A prompt set and the part of it to use."""

    set: str = _option(
        dataclasses.MISSING, "--prompts", metavar="SET|FILE", spec="set",
        help="ultrafeedback (the paper's 1,000 test_gen prompts), alpaca_eval (805), or a JSON/JSONL/Parquet file "
             "(local, s3://, hf://datasets/org/name/path).")
    field: str | None = _option(
        None, "--prompt-field", spec="field",
        help="Field holding the prompt (default: prompt, instruction, question, or the first user turn of messages).")
    limit: int | None = _option(
        None, "--limit", type=click.IntRange(1), spec="limit", help="Use only the first N prompts.")
    sample: int | None = _option(
        None, "--sample", type=click.IntRange(1), spec="sample", help="Use a random sample of N prompts.")
    sample_seed: int = _option(0, "--sample-seed", type=int, spec="seed", help="Seed of --sample.")


def _template_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        from .errors import ExpoError

        raise ExpoError(f"{path}: cannot read the chat template ({exc})") from None


@dataclass(frozen=True)
class EngineOptions(_Options):
    """The vLLM engines of an evaluation or a search, and where they run."""

    tp: int = _option(
        1, "-tp", "--tp", "--tensor-parallel-size", type=click.IntRange(1), spec="tp",
        help="Tensor-parallel size of each generation engine (8 for 70B).")
    reward_tp: int = _option(
        1, "--reward-tp", type=click.IntRange(1), spec="reward_tp", help="Tensor-parallel size of the reward engine.")
    use_gpu: bool | None = _option(
        None, "--gpu/--cpu", spec="device",
        help="Run the engines on GPUs or on CPUs (default: GPUs, unless the installed vLLM is a CPU build). On an "
             "autoscaling cluster GPU nodes are started on demand.")
    max_engines: int | None = _option(
        None, "--max-engines", type=click.IntRange(1), spec="max_engines",
        help="Generation engines in parallel (default: as many as the cluster can grow to, from the autoscaler's "
             "node types; one per node for CPU engines).")
    swap: bool | None = _option(
        None, "--swap/--no-swap", spec="swap",
        help="An engine serves model after model, loading each one's weights in place instead of restarting "
             "(models of another shape get their own engine). Default: on when the installed vLLM is a version "
             "swapping was tested with. Architectures not proven for swapping (docs/weight-swap.md) get their "
             "first swap checked against a fresh load; if it differs, one engine per model.")
    verify_swap: bool = _option(
        False, "--verify-swap", is_flag=True, spec="verify_swap",
        help="Check every weight swap against a fresh load of the same weights (what each layer computes and "
             "holds, on every rank); a difference ends swapping (one engine per model) or, with --swap, the run.")
    max_model_len: int | None = _option(
        None, "--max-model-len", type=click.IntRange(16), spec="max_model_len", help="vLLM max_model_len.")
    dtype: str = _option(
        "auto", "--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), spec="dtype",
        help="vLLM dtype of the engines.")
    trust_remote_code: bool = _option(
        False, "--trust-remote-code", is_flag=True, spec="trust_remote_code",
        help="Allow model code from the checkpoints to run (off by default).")
    model_cache: str | None = _option(
        None, "--model-cache", envvar="EXPO_RAY_MODEL_CACHE", metavar="DIR", spec="model_cache",
        help="Folder on each node for local copies of remote models (an NVMe volume on clusters; default: "
             "$TMPDIR/expo-ray-models).")
    model_cache_gb: float | None = _option(
        None, "--model-cache-gb", envvar="EXPO_RAY_MODEL_CACHE_GB", type=click.FloatRange(0, min_open=True),
        spec="model_cache_gb",
        help="Cap of that folder in GiB; least recently used models no engine uses are evicted (default: the "
             "cache plus the disk's free space, less a reserve).")
    chat_template: str | None = _option(
        None, "--chat-template", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
        help="A Jinja chat template for the generation models (for tokenizers that have none).")
    fail_on_long_prompts: bool = _option(
        False, "--fail-on-long-prompts", is_flag=True, spec="fail_on_long_prompts",
        help="Refuse prompts longer than the model's context (default: skip them, counted in the report).")

    def __post_init__(self) -> None:
        if self.verify_swap and self.swap is False:
            raise ValueError("--verify-swap checks weight swaps, and --no-swap turns them off: give one of them")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "EngineOptions":
        # On the command line --chat-template names a file; the options hold its text.
        options = super().from_params(params, **overrides)
        if "chat_template" not in overrides and options.chat_template is not None:
            options = dataclasses.replace(options, chat_template=_template_text(options.chat_template))
        return options

    def export_cache_settings(self) -> None:
        """Engines read the model cache settings where they run: Ray workers started from here
        inherit this process's EXPO_RAY_* environment."""
        settings = (("EXPO_RAY_MODEL_CACHE", self.model_cache), ("EXPO_RAY_MODEL_CACHE_GB", self.model_cache_gb))
        for key, value in settings:
            if value is not None:
                os.environ[key] = str(value)


@dataclass(frozen=True)
class SamplingOptions(_Options):
    """Sampling for generation; the defaults are the ExPO paper's.

    ``temperature == 0`` means greedy decoding (vLLM then ignores ``top_k`` and ``top_p``, but
    still applies the penalties: use :meth:`greedy` for plain argmax decoding). ``seed`` makes
    sampling reproducible (None: not seeded): each prompt is sampled with its own seed derived from
    ``seed`` and the prompt's token ids (:meth:`request_seed`), so answers to different prompts are
    independent draws, and an answer depends only on its prompt, the weights and ``seed``, not on
    the batch it was generated in. (One seed for every request would give every prompt the same
    random stream: answers would be correlated and a bootstrap interval over prompts meaningless.)
    ``top_k = 0`` disables top-k.
    """

    temperature: float = _option(0.7, "--temperature", type=float, spec="temperature", help="Sampling temperature.")
    top_k: int = _option(50, "--top-k", type=int, spec="top_k", help="Sample from the K likeliest tokens.")
    top_p: float = _option(0.9, "--top-p", type=float, spec="top_p", help="Nucleus sampling threshold.")
    presence_penalty: float = _option(
        0.1, "--presence-penalty", type=float, spec="presence_penalty", help="vLLM presence penalty.")
    frequency_penalty: float = _option(
        0.1, "--frequency-penalty", type=float, spec="frequency_penalty", help="vLLM frequency penalty.")
    seed: int | None = _option(42, "--seed", type=int, spec="seed", help="Sampling seed.")
    max_tokens: int = _option(
        2048, "--max-tokens", type=click.IntRange(1), spec="max_tokens", help="Longest answer, in tokens.")

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @classmethod
    def greedy(cls, max_tokens: int = 2048) -> "SamplingOptions":
        """Deterministic argmax decoding: temperature 0, no top-k/top-p, no penalties."""
        return cls(temperature=0.0, top_k=0, top_p=1.0, presence_penalty=0.0,
                   frequency_penalty=0.0, seed=None, max_tokens=max_tokens)

    def request_seed(self, prompt_ids: Sequence[int]) -> int | None:
        """The seed one prompt is sampled with (None when unseeded)."""
        if self.seed is None:
            return None
        digest = hashlib.sha256(json.dumps([self.seed, list(prompt_ids)]).encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def _alpha_list(ctx, param, value):

    return value if isinstance(value, tuple) else parse_alphas(value)


@dataclass(frozen=True)
class SearchOptions(_Options):
    """The adaptive alpha search (see :mod:`expo_ray.alpha_search.adaptive`)."""

    grid: tuple[float, ...] = _option(
        DEFAULT_SEARCH_GRID, "--alpha", metavar="LIST", callback=_alpha_list, type=str,
        default=",".join(f"{a:g}" for a in DEFAULT_SEARCH_GRID),
        help="The coarse grid the search starts from (it may refine between and beyond these). " + ALPHA_RULE)
    budget: int | None = _option(
        None, "--budget", type=click.IntRange(1), spec="budget",
        help="Generations the search may spend (default: half of what the full grid would take).")
    initial_prompts: int | None = _option(
        None, "--initial-prompts", type=click.IntRange(2),
        help="Prompts per alpha in the first round (default: an eighth of the prompts).")
    refine_steps: int = 2
    shuffle_seed: int = 0
    time_share: bool | None = None   # engines take turns (None: when the cluster cannot hold both)
