"""The extrapolation plan: pure data computed from headers and configs, no tensor I/O.

Tensors are paired BY NAME; output shards mirror the aligned checkpoint's shards and tensor
order. Every problem found is collected and reported at once before anything is written.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..checkpoint.config_defaults import filled
from ..checkpoint.folder import Checkpoint, TensorLocation
from ..checkpoint.identity import sources_fingerprint
from ..checkpoint.safetensors_io import FLOAT_DTYPES
from ..errors import PlanError
from ..options import PlanOptions, finite_number, variant_name

# Config keys that decide tensor shapes and meaning; they must agree between the two models.
STRUCTURAL_KEYS = (
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim", "vocab_size", "tie_word_embeddings",
    "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
)
INTEGER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim", "vocab_size")
NULLABLE_KEYS = ("head_dim", "num_key_value_heads")
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")
HEAD_NAMES = ("lm_head.weight",)
MAX_LISTED = 20

EXTRAPOLATE = "extrapolate"    # aligned + a*(aligned - sft)
COPY = "copy"                  # aligned bytes unchanged
COPY_IDENTICAL = "copy_identical"  # non-float: copied, and must equal the SFT bytes
EXTEND_ROWS = "extend_rows"    # extrapolate the rows both have, copy the rows only aligned has
COMPUTED = "computed"          # TensorPlan.compute gives theta from the SFT tensor (a LoRA adapter's delta)


@dataclass(frozen=True)
class Pattern:
    """A tensor-name pattern: a glob, or a regular expression written 're:EXPR'."""

    text: str

    def matches(self, name: str) -> bool:
        if self.text.startswith("re:"):
            return re.search(self.text[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.text)

    @staticmethod
    def parse(text: str) -> "Pattern":
        if not text:
            raise PlanError("empty tensor-name pattern")
        if text.startswith("re:"):
            try:
                re.compile(text[3:])
            except re.error as exc:
                raise PlanError(f"invalid regular expression {text[3:]!r}: {exc}") from None
        return Pattern(text)


@dataclass(frozen=True)
class AlphaRules:
    """How each tensor's alpha is scaled: tensor alpha = variant alpha * scale.

    Precedence: an exclude pattern (copied unchanged) > the first matching scale rule >
    the layer-group scale (early/middle/late thirds of the decoder layers) > 1.
    """

    scales: tuple[tuple[Pattern, float], ...] = ()
    layer_scales: tuple[float, float, float] | None = None
    exclude: tuple[Pattern, ...] = ()

    @staticmethod
    def build(scales: list[str] = (), layer_scales: str | None = None, exclude: list[str] = ()) -> "AlphaRules":
        parsed = []
        for rule in scales:
            pattern, sep, factor = rule.rpartition("=")
            if not sep or not pattern:
                raise PlanError(f"scale rule {rule!r}: expected PATTERN=FACTOR, e.g. '*.mlp.*=0.5'")
            parsed.append((Pattern.parse(pattern), finite_number(factor, f"scale rule {rule!r}", negative_ok=False)))
        groups = None
        if layer_scales:
            parts = layer_scales.split(",")
            if len(parts) != 3:
                raise PlanError(f"layer scales {layer_scales!r}: expected three numbers EARLY,MIDDLE,LATE")
            groups = tuple(finite_number(p, f"layer scales {layer_scales!r}", negative_ok=False) for p in parts)
        return AlphaRules(tuple(parsed), groups, tuple(Pattern.parse(p) for p in exclude))

    def scale_for(self, name: str, num_layers: int) -> float:
        if any(p.matches(name) for p in self.exclude):
            return 0.0
        for pattern, factor in self.scales:
            if pattern.matches(name):
                return factor
        if self.layer_scales is not None:
            m = LAYER_RE.search(name)
            if m and num_layers > 0:
                return self.layer_scales[layer_group(int(m.group(1)), num_layers)]
        return 1.0

    def factors(self) -> set[float]:
        """Every scale a tensor's alpha may be multiplied by."""
        return {1.0, *(f for _, f in self.scales), *(self.layer_scales or ())}

    def describe(self) -> dict:
        return {
            "scales": [[p.text, f] for p, f in self.scales],
            "layer_scales": list(self.layer_scales) if self.layer_scales else None,
            "exclude": [p.text for p in self.exclude],
        }


def layer_group(index: int, num_layers: int) -> int:
    """0, 1 or 2: which third of the decoder layers `index` belongs to."""
    return min(2, index * 3 // max(1, num_layers))


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str
    shape: tuple[int, ...]
    aligned: TensorLocation
    sft: TensorLocation | None
    action: str
    scale: float = 1.0       # tensor alpha = variant alpha * scale
    shared_rows: int = 0     # for EXTEND_ROWS: rows present in both models
    # For COMPUTED (``aligned`` then locates the SFT tensor): ``compute.chunk(start, count, sft_bytes,
    # alphas, outs=None)`` returns, per tensor alpha, the raw bits of elements [start, start + count)
    # of theta, in ``outs`` when given (e.g. expo_ray.lora.merge.LoraDelta); it reads what else it needs.
    compute: object | None = None

    @property
    def nbytes(self) -> int:
        return self.aligned.info.nbytes


@dataclass(frozen=True)
class ShardPlan:
    key: str                       # file name, the same as the aligned shard
    tensors: tuple[TensorPlan, ...]
    metadata: dict = field(default_factory=dict)  # the aligned shard's header metadata, kept in the outputs

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    sft_uri: str
    aligned_uri: str
    alphas: tuple[float, ...]
    rules: AlphaRules
    options: PlanOptions
    shards: tuple[ShardPlan, ...]
    aux_files: tuple[str, ...]
    has_index: bool
    source_fingerprint: str
    counts: dict = field(default_factory=dict)
    # The inputs by role ("sft", "aligned"), opened once when planning and pinned to the versions
    # the plan read: every later read (tasks, commit) is of those versions (expo_ray.storage.pinned).
    sources: dict = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        return [variant_name(a) for a in self.alphas]

    @property
    def model_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.key for s in self.shards for t in s.tensors}


def _config_types(ckpt: Checkpoint) -> list[str]:
    """Sizes in config.json must be integers (null is allowed where Hugging Face configs use it)."""
    problems = []
    for key in INTEGER_KEYS:
        value = (ckpt.config or {}).get(key, 0)
        if value is None and key in NULLABLE_KEYS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{ckpt.storage.describe('config.json')}: {key} must be a non-negative integer, got "
                            f"{value!r}")
    return problems


def _compare_configs(sft: Checkpoint, aligned: Checkpoint, options: PlanOptions) -> list[str]:
    problems = _config_types(sft) + _config_types(aligned)
    if problems:
        return problems
    # A key one config leaves out means transformers' default (checkpoint.config_defaults).
    a, s = filled(aligned.config), filled(sft.config)
    for key in STRUCTURAL_KEYS:
        if key == "vocab_size" and options.allow_added_rows and a.get(key, 0) >= s.get(key, 0):
            continue
        if a.get(key) != s.get(key):
            problems.append(f"config.json {key}: sft={s.get(key)!r} aligned={a.get(key)!r}")
    if a.get("vocab_size") != s.get("vocab_size") and not options.allow_added_rows:
        problems.append("hint: if the aligned model added tokens (e.g. a chat template token), "
                        "--allow-added-rows extrapolates the shared rows and copies the new ones")
    return problems


def make_plan(sft: str, aligned: str, alphas: Sequence[float], options: PlanOptions = PlanOptions()) -> Plan:
    """Open both checkpoints (headers only), pair tensors by name and validate."""
    rules = AlphaRules.build(list(options.scales), options.layer_scales, list(options.exclude))
    alphas = tuple(float(a) + 0.0 for a in alphas)  # + 0.0: -0.0 is 0.0
    return build_plan(Checkpoint.open(sft), Checkpoint.open(aligned), alphas, rules, options)


def build_plan(sft: Checkpoint, aligned: Checkpoint, alphas: tuple[float, ...],
               rules: AlphaRules = AlphaRules(), options: PlanOptions = PlanOptions()) -> Plan:
    """Pair, validate and lay out every tensor; raise PlanError listing all differences."""
    if sft.source.location == aligned.source.location:
        raise PlanError(f"{aligned.uri}: --sft and --aligned are the same model folder; every variant would "
                        "equal the aligned model")
    for alpha in alphas:
        for factor in sorted(rules.factors()):
            if not math.isfinite(alpha * factor):
                raise PlanError(f"alpha {alpha!r} x scale {factor!r} is not a finite number (beyond float64); "
                                "use a smaller alpha or scale")
    problems = _compare_configs(sft, aligned, options)
    layers = (aligned.config or {}).get("num_hidden_layers")
    num_layers = layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else 0
    if not num_layers:
        indexes = [int(m.group(1)) for n in aligned.tensors if (m := LAYER_RE.search(n))]
        num_layers = max(indexes) + 1 if indexes else 0

    only_sft = sorted(set(sft.tensors) - set(aligned.tensors))
    for name in only_sft:
        problems.append(f"tensor {name}: in the SFT model ({sft.tensors[name].shard}) but not in the aligned model")
    counts = {EXTRAPOLATE: 0, COPY: 0, COPY_IDENTICAL: 0, EXTEND_ROWS: 0}
    shards = []
    for shard_key, header in aligned.headers.items():
        planned = []
        for info in header.tensors:
            loc = TensorLocation(shard_key, info)
            other = sft.tensors.get(info.name)
            plan, problem = _plan_tensor(info.name, loc, other, rules, options, num_layers)
            if problem:
                problems.append(problem)
            else:
                planned.append(plan)
                counts[plan.action] += 1
        metadata = {k: v for k, v in header.metadata.items() if not k.startswith("expo_ray.")}
        shards.append(ShardPlan(shard_key, tuple(planned), metadata))

    tie = bool(filled(aligned.config).get("tie_word_embeddings"))
    if tie:
        by_name = {t.name: t for s in shards for t in s.tensors}
        tied = [by_name[n] for n in EMBED_NAMES + HEAD_NAMES if n in by_name]
        if len(tied) == 2 and (tied[0].scale, tied[0].action) != (tied[1].scale, tied[1].action):
            problems.append(f"tie_word_embeddings is set but the rules treat {tied[0].name} and {tied[1].name} "
                            "differently; they would become untied")

    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PlanError(f"{sft.uri} (sft) and {aligned.uri} (aligned) cannot be extrapolated:\n  "
                        + "\n  ".join(shown) + more)
    for key in aligned.side_files():  # what the commit copies, pinned now
        aligned.source.pin(key)
    fingerprint = sources_fingerprint(sft, aligned)
    return Plan(sft.uri, aligned.uri, tuple(alphas), rules, options, tuple(shards),
                tuple(aligned.aux_files()), aligned.has_index, fingerprint, counts,
                {"sft": sft.source, "aligned": aligned.source})


def _plan_tensor(name, loc, other, rules, options, num_layers):
    info = loc.info
    if other is None:
        if options.copy_unmatched:
            return TensorPlan(name, info.dtype, info.shape, loc, None, COPY), None
        return None, f"tensor {name}: only in the aligned model (use --copy-unmatched to copy it unchanged)"
    o = other.info
    if o.dtype != info.dtype:
        return None, f"tensor {name}: dtype sft={o.dtype} aligned={info.dtype}"
    if info.dtype not in FLOAT_DTYPES:
        if o.shape != info.shape:
            return None, f"tensor {name}: shape sft={list(o.shape)} aligned={list(info.shape)}"
        return TensorPlan(name, info.dtype, info.shape, loc, other, COPY_IDENTICAL), None
    scale = rules.scale_for(name, num_layers)
    if o.shape != info.shape:
        added = (len(o.shape) == len(info.shape) >= 1 and o.shape[1:] == info.shape[1:] and o.shape[0] < info.shape[0])
        if added and options.allow_added_rows:
            action = EXTEND_ROWS if scale else COPY
            return TensorPlan(name, info.dtype, info.shape, loc, other, action, scale, o.shape[0]), None
        hint = " (the aligned model has extra rows: added vocabulary? --allow-added-rows handles it)" if added else ""
        return None, f"tensor {name}: shape sft={list(o.shape)} aligned={list(info.shape)}{hint}"
    return TensorPlan(name, info.dtype, info.shape, loc, other, EXTRAPOLATE if scale else COPY, scale), None


def plan_summary(plan: Plan) -> dict:
    return {
        "sft": plan.sft_uri, "aligned": plan.aligned_uri,
        "alphas": list(plan.alphas), "rules": plan.rules.describe(), "options": plan.options.policies(),
        "shards": len(plan.shards), "tensors": dict(plan.counts), "bytes_per_variant": plan.model_bytes,
    }
