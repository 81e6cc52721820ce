"""The sweep spec (YAML): model pairs x alpha grids x evaluation settings, validated up front.

Every problem names the file, the line and the key, before any work starts:

    destination: s3://bucket/sweeps/nightly       # where variants, responses and reports go
    alphas: [0.1, 0.2, 0.3, 0.4, 0.5]             # default grid for every pair
    pairs:
      - name: tulu-2-70b                          # optional; default from the aligned source
        sft: hf://allenai/tulu-2-70b
        aligned: hf://allenai/tulu-2-dpo-70b
        alphas: [0.1, 0.3]                        # optional, overrides the default grid
        mode: grid                                # grid (default): every alpha extrapolated and evaluated;
                                                  # search: adaptive search on one hot-swapping engine over
                                                  # the first prompt set, only the winner is materialized
        budget: 1500                              # search only: generations (default: half the grid's)
        chat_template: "{{ messages[0]['content'] }}"  # optional: for a tokenizer without one
        rules: {scale: ["*.mlp.*=0.5"], layer_scales: "1,1,1.5", exclude: ["lm_head.weight"]}
        copy_unmatched: false
        allow_added_rows: false
        allow_nonfinite: false                    # inputs may hold NaN/Inf (default: refused)
    chunk_mib: 256                                # working memory per extrapolation task
    sha256: false                                 # also record each file's sha256 (BLAKE3 always)
    evaluation:                                   # optional: extrapolate only without it
      prompts: [{set: ultrafeedback, limit: 200}] # set name or file URI; limit / sample / seed / field
      reward_model: hf://weqweasdas/RM-Mistral-7B
      tp: 8
      reward_tp: 1
      include_sft: false
      sampling: {temperature: 0.7, top_p: 0.9, top_k: 50, max_tokens: 2048, seed: 42}
      # Engine options, as on the command line (all optional):
      device: gpu                                 # gpu | cpu (default: gpu unless vLLM is a CPU build)
      max_engines: 2                              # generation engines at once (default: what the cluster grows to)
      swap: true                                  # weights swapped in place (default: with a tested vLLM)
      verify_swap: false                          # check every swap (default: the first, unproven models)
      max_model_len: 4096
      dtype: auto                                 # auto | bfloat16 | float16 | float32
      trust_remote_code: false
      fail_on_long_prompts: false                 # default: prompts longer than the context are skipped, counted
      model_cache: /nvme/expo-ray-models          # local copies of remote models on each node
      model_cache_gb: 800                         # its cap (least recently used models are evicted)

Every key but the model pairs' is an option of the command line (see expo_ray.options).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass

import click
import yaml

from ..checkpoint import identity
from ..errors import ExpoError
from ..options import DEFAULT_ALPHAS, EngineOptions, PlanOptions, PromptOptions, SamplingOptions, WriteOptions

TOP_KEYS = {"destination": True, "alphas": False, "pairs": True, "evaluation": False,
            **{k: False for k in WriteOptions.spec_keys()}}
PAIR_KEYS = {"name": False, "sft": True, "aligned": True, "alphas": False, "rules": False, "mode": False,
             "budget": False, "chat_template": False, **{k: False for k in PlanOptions.spec_keys()}}
MODES = ("grid", "search")
RULE_KEYS = {"scale": False, "layer_scales": False, "exclude": False}
EVAL_KEYS = {"prompts": True, "reward_model": True, "include_sft": False, "sampling": False,
             **{k: False for k in EngineOptions.spec_keys()}}
DEVICES = {"gpu": True, "cpu": False}
PROMPT_KEYS = {k: k == "set" for k in PromptOptions.spec_keys()}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SpecError(ExpoError):
    pass


@dataclass(frozen=True)
class EvalSpec:
    prompts: tuple[PromptOptions, ...]
    reward_model: str
    include_sft: bool = False
    sampling: SamplingOptions = SamplingOptions()
    engine: EngineOptions = EngineOptions()


@dataclass(frozen=True)
class PairSpec:
    name: str
    sft: str
    aligned: str
    alphas: tuple[float, ...]
    plan: PlanOptions = PlanOptions()
    mode: str = "grid"
    budget: int | None = None
    chat_template: str | None = None   # Jinja text, for models whose tokenizer has no chat template

    @property
    def pair_id(self) -> str:
        """Deterministic id from the inputs and settings (not from the name)."""
        return identity.pair_id(self.sft, self.aligned, self.plan)

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.pair_id}"

    def engine(self, evaluation: EvalSpec) -> EngineOptions:
        """The evaluation's engine options, with this pair's chat template."""
        if self.chat_template is None:
            return evaluation.engine
        return dataclasses.replace(evaluation.engine, chat_template=self.chat_template)


@dataclass(frozen=True)
class SweepSpec:
    path: str
    destination: str
    pairs: tuple[PairSpec, ...]
    evaluation: EvalSpec | None
    write: WriteOptions = WriteOptions()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Loader(yaml.SafeLoader):
    """Keeps each mapping's line numbers (key -> line) for error messages."""


def _construct_mapping(loader, node):
    mapping = loader.construct_mapping(node, deep=True)
    lines = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in lines:  # YAML would silently keep the last value
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        lines[key] = key_node.start_mark.line + 1
    return _Mapping(mapping, node.start_mark.line + 1, lines)


class _Mapping(dict):
    def __init__(self, data, line, lines):
        super().__init__(data)
        self.line, self.lines = line, lines


def _construct_float(loader, node):
    value = loader.construct_yaml_float(node)
    mantissa = str(node.value).lower().split("e")[0]
    if value == 0 and any(c in "123456789" for c in mantissa):  # 1.0e-400 would silently become 0
        raise yaml.constructor.ConstructorError(None, None, f"{node.value} rounds to 0 as a float64", node.start_mark)
    return value


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _Checker:
    def __init__(self, path: str):
        self.path = path
        self.problems: list[str] = []

    def at(self, mapping, key=None) -> str:
        line = getattr(mapping, "lines", {}).get(key) if key is not None else None
        line = line or getattr(mapping, "line", None)
        return f"{self.path}" + (f" line {line}" if line else "")

    def fail(self, where: str, what: str, message: str) -> None:
        self.problems.append(f"{where}: {what}: {message}")

    def keys(self, mapping, allowed: dict, what: str) -> bool:
        if not isinstance(mapping, dict):
            self.fail(self.at(mapping), what, "expected a mapping")
            return False
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
                self.fail(self.at(mapping, key), what, f"unknown key {key!r}{hint}")
        for key, required in allowed.items():
            if required and key not in mapping:
                self.fail(self.at(mapping), what, f"missing required key {key!r}")
        return True

    def alphas(self, mapping, key: str, what: str) -> tuple[float, ...]:
        value = mapping.get(key)
        where = self.at(mapping, key)
        if not isinstance(value, list) or not value:
            self.fail(where, f"{what}.{key}", "must be a non-empty list of numbers")
            return ()
        out = []
        for a in value:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
                self.fail(where, f"{what}.{key}", f"{a!r} is not a finite number")
            elif a < 0:
                self.fail(where, f"{what}.{key}", f"{a} is negative (extrapolation uses alpha >= 0; alpha 0 is the "
                                                  "aligned model)")
            else:
                out.append(float(a) + 0.0)  # -0.0 is 0.0
        if len(set(out)) != len(out):
            self.fail(where, f"{what}.{key}", "repeats a value")
        return tuple(out)

    def string(self, mapping, key, what, required=True) -> str | None:
        value = mapping.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(self.at(mapping, key), f"{what}.{key}", "must be a non-empty string")
            return None
        return value

    def integer(self, mapping, key, what, default, minimum=1):
        value = mapping.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(self.at(mapping, key), f"{what}.{key}", f"must be an integer >= {minimum}")
            return default
        return value

    def options(self, cls, mapping, what: str) -> dict:
        """The fields of the options class ``cls`` that ``mapping`` sets (by their spec keys), checked."""
        values = {}
        for key, f in cls.spec_keys().items():
            if key in mapping:
                problem = _option_problem(f, mapping[key])
                if problem:
                    self.fail(self.at(mapping, key), f"{what}.{key}", problem)
                else:
                    values[f.name] = DEVICES[mapping[key]] if key == "device" else mapping[key]
        return values

    def build(self, cls, values: dict, mapping, what: str):
        """``cls(**values)``, or its defaults with the problem recorded when it refuses them."""
        try:
            return cls(**values)
        except ValueError as exc:
            self.fail(self.at(mapping), what, str(exc))
            return cls()

    def boolean(self, mapping, key, what) -> bool:
        value = mapping.get(key, False)
        if not isinstance(value, bool):
            self.fail(self.at(mapping, key), f"{what}.{key}", "must be true or false")
            return False
        return value


def _option_problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` for the options field ``f`` (None: nothing), from its flag."""
    kind, decls = f.metadata["click"].get("type"), f.metadata["decls"]
    if f.metadata["spec"] == "device":
        return None if value in DEVICES else f"{value!r}: use gpu or cpu"
    if f.metadata["click"].get("is_flag") or any("/" in d for d in decls):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(kind, click.Choice):
        return None if value in kind.choices else f"{value!r}: use one of {', '.join(kind.choices)}"
    if isinstance(kind, click.IntRange) or kind is int:
        low = kind.min if isinstance(kind, click.IntRange) else 0
        ok = not isinstance(value, bool) and isinstance(value, int) and value >= low
        return None if ok else f"must be an integer >= {low}"
    if isinstance(kind, click.FloatRange) or kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            return "must be a non-negative number"
        if isinstance(kind, click.FloatRange) and (value <= kind.min or (kind.max is not None and value > kind.max)):
            return f"must be a number above {kind.min:g}" + (f", at most {kind.max:g}" if kind.max is not None else "")
        return None
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def parse_spec(text: str, path: str = "<spec>") -> SweepSpec:
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else path
        raise SpecError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise SpecError(f"{path}: not a usable sweep spec (nested too deeply)") from None
    c = _Checker(path)
    if not c.keys(raw, TOP_KEYS, "spec"):
        raise SpecError("\n".join(c.problems))
    destination = c.string(raw, "destination", "spec")
    default_alphas = c.alphas(raw, "alphas", "spec") if "alphas" in raw else DEFAULT_ALPHAS
    write = WriteOptions(**c.options(WriteOptions, raw, "spec"))
    pairs = []
    raw_pairs = raw.get("pairs")
    if not isinstance(raw_pairs, list) or not raw_pairs:
        c.fail(c.at(raw, "pairs"), "spec.pairs", "must be a non-empty list of model pairs")
        raw_pairs = []
    names = set()
    for i, p in enumerate(raw_pairs):
        what = f"pairs[{i}]"
        if not c.keys(p, PAIR_KEYS, what):
            continue
        sft, aligned = c.string(p, "sft", what), c.string(p, "aligned", what)
        name = p.get("name") or (aligned.rstrip("/").split("/")[-1].split("@")[0] if aligned else f"pair{i}")
        if not isinstance(name, str) or not NAME_RE.match(name):
            c.fail(c.at(p, "name"), f"{what}.name", f"{name!r}: use letters, digits, '.', '_' or '-'")
        elif name in names:
            c.fail(c.at(p, "name"), f"{what}.name", f"{name!r} is used by another pair")
        names.add(name)
        alphas = c.alphas(p, "alphas", what) if "alphas" in p else default_alphas
        rules = p.get("rules") or _Mapping({}, getattr(p, "line", None), {})
        c.keys(rules, RULE_KEYS, f"{what}.rules")
        scale, exclude = rules.get("scale", []), rules.get("exclude", [])
        for key, value in (("scale", scale), ("exclude", exclude)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                c.fail(c.at(rules, key), f"{what}.rules.{key}", "must be a list of strings")
        layer_scales = rules.get("layer_scales")
        if layer_scales is not None and not isinstance(layer_scales, str):
            c.fail(c.at(rules, "layer_scales"), f"{what}.rules.layer_scales", 'must be a string "EARLY,MIDDLE,LATE"')
        mode = p.get("mode", "grid")
        if mode not in MODES:
            c.fail(c.at(p, "mode"), f"{what}.mode", f"{mode!r}: use one of {', '.join(MODES)}")
        budget = c.integer(p, "budget", what, None)
        if "budget" in p and mode != "search":
            c.fail(c.at(p, "budget"), f"{what}.budget", "only applies with mode: search")
        plan = PlanOptions(scales=tuple(scale) if isinstance(scale, list) else (),
                           layer_scales=layer_scales if isinstance(layer_scales, str) else None,
                           exclude=tuple(exclude) if isinstance(exclude, list) else (),
                           **c.options(PlanOptions, p, what))
        if sft and aligned:
            pairs.append(PairSpec(name, sft, aligned, alphas, plan, mode if mode in MODES else "grid", budget,
                                  c.string(p, "chat_template", what, required=False)))
    evaluation = None
    if raw.get("evaluation") is not None:
        e = raw["evaluation"]
        if c.keys(e, EVAL_KEYS, "evaluation"):
            prompts = []
            raw_prompts = e.get("prompts")
            if isinstance(raw_prompts, (str, dict)):
                raw_prompts = [raw_prompts]
            if not isinstance(raw_prompts, list) or not raw_prompts:
                c.fail(c.at(e, "prompts"), "evaluation.prompts", "must name at least one prompt set")
                raw_prompts = []
            for j, ps in enumerate(raw_prompts):
                what = f"evaluation.prompts[{j}]"
                if isinstance(ps, str):
                    prompts.append(PromptOptions(ps))
                elif c.keys(ps, PROMPT_KEYS, what):
                    prompts.append(PromptOptions(**{"set": "", **c.options(PromptOptions, ps, what)}))
            sampling = e.get("sampling") or {}
            values = (c.options(SamplingOptions, sampling, "evaluation.sampling")
                      if c.keys(sampling, {k: False for k in SamplingOptions.spec_keys()}, "evaluation.sampling")
                      else {})
            evaluation = EvalSpec(tuple(prompts), c.string(e, "reward_model", "evaluation") or "",
                                  c.boolean(e, "include_sft", "evaluation"),
                                  c.build(SamplingOptions, values, sampling, "evaluation.sampling"),
                                  EngineOptions(**c.options(EngineOptions, e, "evaluation")))
    if evaluation is None:
        for i, p in enumerate(raw_pairs):
            if isinstance(p, dict) and p.get("mode") == "search":
                c.fail(c.at(p, "mode"), f"pairs[{i}].mode", "search needs an evaluation section (prompts, reward "
                                                            "model)")
    if c.problems:
        raise SpecError(f"{path}: invalid sweep spec:\n  " + "\n  ".join(c.problems))
    return SweepSpec(path, destination, tuple(pairs), evaluation, write)


def load_spec(path: str) -> SweepSpec:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8") from None
    return parse_spec(text, path)
