"""A PEFT LoRA adapter folder read from its config and safetensors header (no tensor data).

What PEFT writes for LoRA (``adapter_config.json`` + ``adapter_model.safetensors``, names
prefixed ``base_model.model.``):

* ``M.lora_A.weight`` (r, in) and ``M.lora_B.weight`` (out, r): the delta of ``M.weight`` is
  ``s * B @ A`` (``(B @ A).T`` when the base stores the weight as (in, out), GPT-2's Conv1D);
* ``M.lora_embedding_A`` (r, vocab) and ``M.lora_embedding_B`` (dim, r): the delta of an
  embedding ``M.weight`` is ``s * (B @ A).T``;
* ``M.lora_B.bias`` (``lora_bias``): the delta of ``M.bias`` is ``s * b``;
* whole tensors that replace the base's: ``modules_to_save`` (``M.weight``, ``M.bias``), trained
  biases (``bias: all | lora_only``; ``M.bias`` or ``M.base_layer.bias``) and the base layers PEFT
  saves beside an embedding or head LoRA (``M.base_layer.weight``).

``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module from
``rank_pattern`` / ``alpha_pattern`` (PEFT's rule: the first key that matches the end of the
module name at a dot). What is not linear in the delta (DoRA, other ``peft_type`` s, quantized
or base-modifying initialisations, unknown tensors) is refused with one line naming the key.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from ..checkpoint.safetensors_io import FLOAT_DTYPES, Header, TensorInfo, read_header
from ..errors import InvalidCheckpoint
from ..storage import Source, Storage, open_storage

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 16 * 1024 * 1024
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
# Config keys whose (truthy) value makes the adapter something a scaled delta cannot express.
NONLINEAR_KEYS = {
    "use_dora": "DoRA rescales every column by the norm of the merged weight, which is not linear in the delta",
    "use_qalora": "QA-LoRA pools the input in groups for a quantized base",
    "layer_replication": "layer replication changes the model's layers, not their weights",
    "alora_invocation_tokens": "activated LoRA applies the delta only after given tokens",
    "use_bdlora": "block-diagonal LoRA is not a plain low-rank delta",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported here",
    "trainable_token_indices": "trainable token rows are not supported here",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "kasa_config": "KaSA is not a plain low-rank delta",
    "velora_config": "VeLoRA is not a plain low-rank delta",
    "monteclora_config": "MonteCLoRA samples its delta",
    "megatron_config": "Megatron-sharded LoRA layers are not supported here",
}
# init_lora_weights values that change the base model's weights when PEFT loads the adapter.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
LICENSE_PREFIXES = ("license", "licence", "copying", "notice", "use_policy")


@dataclass(frozen=True)
class LowRank:
    """One module's LoRA: ``delta(base) = scale * B @ A`` (transposed when ``transposed``)."""

    module: str               # e.g. model.layers.0.self_attn.q_proj
    base: str                 # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    a: TensorInfo             # (r, in) -- lora_A / lora_embedding_A
    b: TensorInfo             # (out, r) -- lora_B / lora_embedding_B
    rank: int
    scale: float              # lora_alpha / r (or / sqrt(r)), float64
    embedding: bool           # lora_embedding_A/B: delta = scale * (B @ A).T
    bias: TensorInfo | None = None  # lora_B.bias: delta of the base's bias = scale * b


@dataclass(frozen=True)
class Whole:
    """A whole tensor of the adapter that replaces the base tensor ``base``."""

    base: str
    info: TensorInfo
    why: str                  # "modules_to_save", "bias" or "base layer"


@dataclass(frozen=True)
class Adapter:
    """A validated PEFT LoRA adapter: its config, its tensors grouped by what they do, its side files."""

    uri: str
    config: dict
    header: Header
    modules: tuple[LowRank, ...]
    whole: tuple[Whole, ...]
    files: tuple[str, ...]    # the folder's top-level files
    # The folder, pinned to the versions of the files read here (expo_ray.storage.pinned): a plan
    # carries it to the tasks and the commit, whose reads must be of those versions.
    source: Source | None = None

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules), default=0)

    @property
    def dtype(self) -> str:
        dtypes = sorted({m.a.dtype for m in self.modules} | {m.b.dtype for m in self.modules})
        return ",".join(dtypes)

    def side_files(self) -> list[str]:
        """Tokenizer and licence files that travel with every adapter variant."""
        extra = sorted(f for f in self.files if f.lower().startswith(LICENSE_PREFIXES))
        return [f for f in TOKENIZER_FILES if f in self.files] + extra

    def describe(self, key: str = "") -> str:
        return (self.source.storage if self.source is not None else open_storage(self.uri)).describe(key)


def is_adapter(source: str | Storage) -> bool:
    """Whether ``source`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    storage = open_storage(source) if isinstance(source, str) else source
    return storage.exists(CONFIG_FILE)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of ``module``
    at a dot boundary (keys are regular expressions)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, module: str) -> tuple[int, float]:
    """(rank, scale) of ``module`` from the config: ``lora_alpha / r`` or, with use_rslora,
    ``lora_alpha / sqrt(r)``, per module from rank_pattern and alpha_pattern."""
    rank = pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
    return rank, float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _number(config: dict, key: str, label: str, integer: bool = False):
    value = config.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        raise InvalidCheckpoint(f"{label}: {key} must be a positive {'integer' if integer else 'number'}, "
                                f"got {value!r}")
    return value


def check_config(config: dict, label: str) -> None:
    """Refuse, in one line naming the key, what the scaled-delta arithmetic cannot express."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidCheckpoint(f"{label}: peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) are "
                                "extrapolated")
    for key, why in NONLINEAR_KEYS.items():
        if config.get(key):
            raise InvalidCheckpoint(f"{label}: {key} is set ({why}); not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise InvalidCheckpoint(f"{label}: init_lora_weights is {init!r}, which changes the base model's weights "
                                "when PEFT loads the adapter; convert it to a plain LoRA first (PEFT's "
                                "path_initial_model_for_weight_conversion)")
    if config.get("loftq_config"):
        raise InvalidCheckpoint(f"{label}: loftq_config is set (LoftQ changes the base model's weights); not supported")
    _number(config, "r", label, integer=True)
    _number(config, "lora_alpha", label)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise InvalidCheckpoint(f"{label}: {key} must be a mapping of module patterns to numbers")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error:
                raise InvalidCheckpoint(f"{label}: {key} key {pattern!r} is not a regular expression") from None
            _number(patterns, pattern, f"{label}: {key}", integer=key == "rank_pattern")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InvalidCheckpoint(f"{label}: bias is {config.get('bias')!r}; expected none, all or lora_only")
    targets = config.get("modules_to_save") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise InvalidCheckpoint(f"{label}: modules_to_save must be a list of module names")


def _in_modules_to_save(module: str, names: list[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def classify(header: Header, config: dict, label: str) -> tuple[tuple[LowRank, ...], tuple[Whole, ...]]:
    """Group the adapter's tensors into LoRA modules and whole tensors; refuse anything else."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    whole: list[Whole] = []
    saved = config.get("modules_to_save") or []
    biased = config.get("bias", "none") != "none"
    for info in header.tensors:
        name = info.name.removeprefix(PREFIX)
        if info.dtype not in FLOAT_DTYPES:
            raise InvalidCheckpoint(f"{label}: tensor {info.name} is {info.dtype}; a quantized adapter is not "
                                    "supported (LoRA weights must be F16, BF16, F32 or F64)")
        module, _, leaf = name.rpartition(".")
        kind = None
        for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
                             (".lora_embedding_A", "EA"), (".lora_embedding_B", "EB")):
            if name.endswith(suffix):
                module, kind = name[:-len(suffix)], role
                break
        if kind is not None:
            pairs.setdefault(module, {})[kind] = info
        elif name.endswith((".base_layer.weight", ".base_layer.bias")):
            base_module = name[:-len(".base_layer.weight" if leaf == "weight" else ".base_layer.bias")]
            whole.append(Whole(f"{base_module}.{leaf}", info, "base layer"))
        elif _in_modules_to_save(module, saved):
            whole.append(Whole(name, info, "modules_to_save"))
        elif biased and leaf == "bias":
            whole.append(Whole(name, info, "bias"))
        else:
            raise InvalidCheckpoint(f"{label}: tensor {info.name} is neither a LoRA matrix (lora_A/lora_B, "
                                    "lora_embedding_A/B) nor a module PEFT saves whole; not supported")
    modules = []
    for module, parts in pairs.items():
        embedding = "EA" in parts or "EB" in parts
        a, b = (parts.get("EA"), parts.get("EB")) if embedding else (parts.get("A"), parts.get("B"))
        if a is None or b is None or (embedding and ("A" in parts or "B" in parts)):
            missing = "lora_A" if a is None else "lora_B"
            raise InvalidCheckpoint(f"{label}: module {module} has no {missing} tensor (or mixes embedding and "
                                    "linear LoRA tensors)")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise InvalidCheckpoint(f"{label}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                    "are not (r, in) and (out, r)")
        rank, scale = module_scale(config, module)
        if a.shape[0] != rank:
            raise InvalidCheckpoint(f"{label}: module {module} has rank {a.shape[0]} but the config gives it r = "
                                    f"{rank} (r / rank_pattern)")
        bias = parts.get("bias")
        if bias is not None and (not config.get("lora_bias") or bias.shape != (b.shape[0],)):
            raise InvalidCheckpoint(f"{label}: tensor {bias.name} is a LoRA bias, but lora_bias is not set or its "
                                    f"shape {list(bias.shape)} is not ({b.shape[0]},)")
        modules.append(LowRank(module, f"{module}.weight", a, b, rank, scale, embedding, bias))
    if not modules and not whole:
        raise InvalidCheckpoint(f"{label}: holds no tensors")
    bases = [w.base for w in whole]
    twice = sorted({b for b in bases if bases.count(b) > 1})
    if twice:
        raise InvalidCheckpoint(f"{label}: base tensor {twice[0]} is replaced by two tensors of the adapter")
    return tuple(modules), tuple(whole)


def open_adapter(source: str | Storage | Source) -> Adapter:
    """Read and validate the adapter at ``source`` (local path, s3://, hf://): config and header only,
    each pinned to the version read."""
    pinned = Source.open(source)
    storage = pinned.storage
    files = [f for f in storage.list() if "/" not in f]
    if CONFIG_FILE not in files:
        raise InvalidCheckpoint(f"{storage.describe()}: not a PEFT adapter folder (no {CONFIG_FILE})")
    label = storage.describe(CONFIG_FILE)
    try:
        config = json.loads(pinned.read_bytes(CONFIG_FILE, limit=MAX_CONFIG_BYTES))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidCheckpoint(f"{label}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidCheckpoint(f"{label}: expected a JSON object")
    check_config(config, label)
    if WEIGHTS_FILE not in files:
        pickles = [f for f in PICKLE_FILES if f in files]
        if pickles:
            raise InvalidCheckpoint(f"{storage.describe(pickles[0])}: pickle adapters are never loaded (unpickling "
                                    "runs arbitrary code); save it with safe_serialization=True")
        raise InvalidCheckpoint(f"{storage.describe()}: no {WEIGHTS_FILE}")
    with pinned.open_reader(WEIGHTS_FILE) as reader:
        header = read_header(storage, WEIGHTS_FILE, reader)
    modules, whole = classify(header, config, storage.describe(WEIGHTS_FILE))
    return Adapter(storage.uri, config, header, modules, whole, tuple(sorted(files)), pinned)
