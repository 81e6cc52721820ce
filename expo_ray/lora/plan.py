"""Plans for an aligned model that is a PEFT LoRA adapter on the SFT model.

With the adapter's delta ``dW = s * B @ A``, ``theta(alpha) = theta_sft + (1 + alpha) * dW``: every
variant is the adapter with its delta scaled by ``1 + alpha``. Two forms, both ordinary
:class:`~expo_ray.extrapolation.plan.Plan` s that :func:`expo_ray.publish.run.run_plan` executes
(tasks, resume, commit, verify):

* ``adapter`` (the default): one PEFT adapter folder per alpha. The scale is carried in the
  config (``lora_alpha`` and every ``alpha_pattern`` value times ``1 + alpha``), so the LoRA
  tensors are copied bit for bit and nothing is rounded; the whole tensors the adapter holds
  (``modules_to_save``, trained biases) are extrapolated against the SFT tensors by the usual
  correctly rounded kernel. Megabytes per alpha.
* ``merged`` (``--merge``): full model folders shaped like the SFT checkpoint; each changed tensor
  is ``theta_sft + (1 + alpha) * s * B @ A`` computed by :class:`~.merge.LoraDelta` in row blocks,
  untouched tensors copied.

Alpha rules (``--scale``, ``--layer-scales``, ``--exclude``) apply by the name of the base tensor
a module changes: in the adapter form each module then gets its own ``alpha_pattern`` entry.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..checkpoint.folder import Checkpoint, TensorLocation
from ..checkpoint.identity import checkpoint_fingerprint
from ..errors import PlanError
from ..extrapolation.plan import (
    COMPUTED,
    COPY,
    EMBED_NAMES,
    EXTRAPOLATE,
    HEAD_NAMES,
    LAYER_RE,
    AlphaRules,
    Plan,
    ShardPlan,
    TensorPlan,
)
from ..options import PlanOptions
from ..storage import Source, open_storage
from .adapter import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, Adapter, is_adapter, open_adapter
from .merge import LoraDelta
from .validate import Fit, fit_adapter

ADAPTER = "adapter"
MERGED = "merged"


@dataclass(frozen=True)
class LoraPlan(Plan):
    """A plan whose aligned model is a LoRA adapter (``adapter_uri``); ``form`` says what is written.

    For the ``merged`` form ``aligned_uri`` is the SFT model (the tasks copy the untouched tensors
    from there); everything that names the aligned model (manifest, card) uses ``adapter_uri``."""

    form: str = ADAPTER
    adapter_uri: str = ""
    adapter_config: dict = field(default_factory=dict)
    module_scales: tuple[tuple[str, float], ...] = ()   # adapter form: (module, alpha-rule scale)
    side: tuple[tuple[str, str], ...] = ()               # (file, location of its source) for every variant

    def config_for(self, alpha: float) -> dict:
        """adapter_config.json of the adapter variant for ``alpha``."""
        return scaled_config(self.adapter_config, dict(self.module_scales), alpha)


def _number(value: float):
    """An integral float as an int (so alpha 0 keeps the input config's values as they were)."""
    return int(value) if float(value).is_integer() and abs(value) < 2 ** 53 else value


def scaled_config(config: dict, module_scales: dict[str, float], alpha: float) -> dict:
    """``config`` with every module's delta scaled by ``1 + alpha * rule scale``: through
    ``lora_alpha`` and ``alpha_pattern`` alone when every module has the same factor, else with one
    exact ``alpha_pattern`` entry per module (PEFT and vLLM take the first matching key)."""
    out = json.loads(json.dumps(config))
    factors = {m: 1.0 + alpha * s for m, s in module_scales.items()}
    if len(set(factors.values())) <= 1:
        factor = next(iter(factors.values()), 1.0 + alpha)
        out["lora_alpha"] = _number(config["lora_alpha"] * factor)
        out["alpha_pattern"] = {k: _number(v * factor) for k, v in (config.get("alpha_pattern") or {}).items()}
        return out
    from .adapter import pattern_value

    patterns = config.get("alpha_pattern") or {}
    out["alpha_pattern"] = {re.escape(m): _number(pattern_value(patterns, m, config["lora_alpha"]) * f)
                            for m, f in factors.items()}
    return out


def adapter_fingerprint(adapter: Adapter) -> str:
    """The adapter's identity: its weights' header and version, its config's and side files' versions."""
    source = adapter.source or Source.open(adapter.uri)
    ckpt = Checkpoint(source, {WEIGHTS_FILE: adapter.header}, None, None, list(adapter.files))
    return hashlib.sha256((checkpoint_fingerprint(ckpt)
                           + json.dumps([CONFIG_FILE, source.storage.version(CONFIG_FILE)])).encode()).hexdigest()


def adapter_identity(uri: str) -> str:
    """Identity of an adapter evaluated as it is (alpha 0): its fingerprint, with a Hub location."""
    adapter = open_adapter(uri)
    prefix = adapter.uri if adapter.uri.startswith("hf://") else ""
    return hashlib.sha256((prefix + adapter_fingerprint(adapter)).encode()).hexdigest()


def _num_layers(sft: Checkpoint) -> int:
    layers = (sft.config or {}).get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        return layers
    indexes = [int(m.group(1)) for n in sft.tensors if (m := LAYER_RE.search(n))]
    return max(indexes) + 1 if indexes else 0


def _check_alphas(alphas: Sequence[float], rules: AlphaRules) -> None:
    for alpha in alphas:
        for factor in sorted(rules.factors()):
            if not math.isfinite(1.0 + alpha * factor):
                raise PlanError(f"alpha {alpha!r} x scale {factor!r} is not a finite number (beyond float64)")


def make_plan(sft: str, aligned: str, alphas: Sequence[float], options: PlanOptions = PlanOptions()) -> Plan:
    """The plan of a pair whose aligned model is a full checkpoint or a PEFT LoRA adapter (detected
    from its ``adapter_config.json``): adapter variants by default, full folders with ``merge``."""
    from ..extrapolation.plan import make_plan as full_plan

    if not is_adapter(aligned):
        if options.merge is False:
            raise PlanError(f"{open_storage(aligned).describe()}: --adapter-variants needs a LoRA adapter as the "
                            "aligned model (a folder with adapter_config.json)")
        return full_plan(sft, aligned, alphas, options)
    alphas = tuple(float(a) + 0.0 for a in alphas)  # + 0.0: -0.0 is 0.0
    return lora_plan(Checkpoint.open(sft), open_adapter(aligned), alphas, options)


def lora_plan(sft: Checkpoint, adapter: Adapter, alphas: tuple[float, ...],
              options: PlanOptions = PlanOptions()) -> LoraPlan:
    """Validate ``adapter`` against ``sft`` and lay out the variants (merged form with ``options.merge``)."""
    import logging

    from .validate import base_name_differs

    rules = AlphaRules.build(list(options.scales), options.layer_scales, list(options.exclude))
    _check_alphas(alphas, rules)
    fit = fit_adapter(adapter, sft)
    if base_name_differs(adapter, sft.uri):
        logging.getLogger("expo_ray").warning(
            "%s says it was made for %s, the SFT model given is %s (the shapes fit)", adapter.describe(),
            adapter.base_model, sft.uri)
    form = MERGED if options.merge else ADAPTER
    fingerprint = hashlib.sha256((checkpoint_fingerprint(sft) + adapter_fingerprint(adapter) + form).encode()
                                 ).hexdigest()
    num_layers = _num_layers(sft)
    build = _merged if form == MERGED else _adapter_form
    plan = build(sft, adapter, fit, alphas, rules, options, num_layers, fingerprint)
    # What the commit copies, pinned now (the adapter's card too: its licence goes into the variants').
    by_uri = {s.uri: s for s in plan.sources.values()}
    for key, uri in plan.side:
        by_uri[uri].pin(key)
    if "README.md" in adapter.files:
        plan.sources["adapter"].pin("README.md")
    return plan


def _metadata(header) -> dict:
    """A shard header's metadata kept in the outputs (not expo-ray's own)."""
    return {k: v for k, v in header.metadata.items() if not k.startswith("expo_ray.")}


def _adapter_form(sft, adapter, fit: Fit, alphas, rules, options, num_layers, fingerprint) -> LoraPlan:
    replaced = {r.whole.info.name: r for r in fit.replacements}
    tensors, problems, counts = [], [], {"lora": 0, EXTRAPOLATE: 0, COPY: 0}
    for info in adapter.header.tensors:  # the adapter file's own order
        loc = TensorLocation(WEIGHTS_FILE, info)
        r = replaced.get(info.name)
        if r is None:
            tensors.append(TensorPlan(info.name, info.dtype, info.shape, loc, None, COPY))
            counts["lora"] += 1
            continue
        if r.sft.info.dtype != info.dtype:
            problems.append(f"tensor {info.name} ({r.whole.why}) is {info.dtype} but the SFT model's {r.whole.base} "
                            f"is {r.sft.info.dtype}; adapter variants extrapolate it in one dtype (--merge works)")
            continue
        scale = rules.scale_for(r.whole.base, num_layers)
        action = EXTRAPOLATE if scale else COPY
        tensors.append(TensorPlan(info.name, info.dtype, info.shape, loc, r.sft, action, scale))
        counts[action] += 1
    if problems:
        raise PlanError(f"{adapter.describe()}: cannot be extrapolated as adapter variants: {problems[0]}"
                        + (f"; and {len(problems) - 1} more" if len(problems) > 1 else ""))
    module_scales = tuple((t.lora.module, rules.scale_for(t.lora.base, num_layers)) for t in fit.targets)
    side = tuple((f, adapter.uri) for f in adapter.side_files())
    shards = (ShardPlan(WEIGHTS_FILE, tuple(tensors), _metadata(adapter.header)),)
    return LoraPlan(sft.uri, adapter.uri, alphas, rules, options, shards, (), False, fingerprint, counts,
                    {"sft": sft.source, "aligned": adapter.source, "adapter": adapter.source},
                    form=ADAPTER, adapter_uri=adapter.uri, adapter_config=adapter.config,
                    module_scales=module_scales, side=side)


def _merged(sft, adapter, fit: Fit, alphas, rules, options, num_layers, fingerprint) -> LoraPlan:
    deltas: dict[str, dict] = {}
    for t in fit.targets:
        deltas.setdefault(t.sft.info.name, {}).update(scale=t.lora.scale, a=t.lora.a, b=t.lora.b,
                                                      transposed=t.transposed)
        if t.sft_bias is not None:
            deltas.setdefault(t.sft_bias.info.name, {}).update(scale=t.lora.scale, bias=t.lora.bias)
    for r in fit.replacements:
        deltas.setdefault(r.sft.info.name, {})["whole"] = r.whole.info
    tied = bool((sft.config or {}).get("tie_word_embeddings"))
    if tied and set(deltas) & set(EMBED_NAMES + HEAD_NAMES):
        raise PlanError(f"{adapter.describe()}: the SFT model ties its embeddings to its output head and the adapter "
                        "changes the embeddings; merged, the change would reach the head too, which it does not "
                        "under PEFT: use adapter variants (without --merge)")
    shards, counts = [], {COMPUTED: 0, COPY: 0}
    for shard_key, header in sft.headers.items():
        planned = []
        for info in header.tensors:
            loc = TensorLocation(shard_key, info)
            spec = deltas.get(info.name)
            if spec is None:
                planned.append(TensorPlan(info.name, info.dtype, info.shape, loc, None, COPY))
            else:
                delta = LoraDelta(info.name, adapter.source, info.dtype, tuple(info.shape), **spec)
                planned.append(TensorPlan(info.name, info.dtype, info.shape, loc, loc, COMPUTED,
                                          rules.scale_for(info.name, num_layers), compute=delta))
            counts[planned[-1].action] += 1
        shards.append(ShardPlan(shard_key, tuple(planned), _metadata(header)))
    return LoraPlan(sft.uri, sft.uri, alphas, rules, options, tuple(shards), tuple(sft.aux_files()), sft.has_index,
                    fingerprint, counts, {"sft": sft.source, "aligned": sft.source, "adapter": adapter.source},
                    form=MERGED, adapter_uri=adapter.uri, adapter_config=adapter.config,
                    side=_merged_side(sft, adapter))


def _merged_side(sft: Checkpoint, adapter: Adapter) -> tuple[tuple[str, str], ...]:
    """Config and generation settings of the SFT model; the tokenizer of the adapter when it carries
    one (as the aligned model's), else the SFT model's; licences of both."""
    own_tokenizer = any(f in adapter.files for f in TOKENIZER_FILES)
    side = [(f, sft.uri) for f in sft.aux_files() if not (own_tokenizer and f in TOKENIZER_FILES)]
    names = {f for f, _ in side}
    side += [(f, adapter.uri) for f in adapter.side_files() if f not in names]
    return tuple(side)


def plan_summary(plan: Plan) -> dict:
    """:func:`expo_ray.extrapolation.plan.plan_summary`, naming the adapter and the form for an adapter pair."""
    from ..extrapolation.plan import plan_summary as summary

    out = summary(plan)
    if isinstance(plan, LoraPlan):
        out.update(aligned=plan.adapter_uri, form=plan.form)
    return out


def form_of(plan: Plan) -> str:
    """"full", "adapter" or "merged"."""
    return plan.form if isinstance(plan, LoraPlan) else "full"


__all__ = ["ADAPTER", "LoraPlan", "MERGED", "adapter_fingerprint", "adapter_identity",
           "form_of", "lora_plan", "make_plan", "plan_summary", "scaled_config"]
