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
      max_model_len: 4096
      dtype: auto                                 # auto | bfloat16 | float16 | float32
      trust_remote_code: false
      fail_on_long_prompts: false                 # default: prompts longer than the context are skipped, counted
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field

import yaml

from . import identity
from .errors import ExpoError

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "seed", "max_tokens")
TOP_KEYS = {"destination": True, "alphas": False, "pairs": True, "evaluation": False, "chunk_mib": False}
PAIR_KEYS = {"name": False, "sft": True, "aligned": True, "alphas": False, "rules": False,
             "copy_unmatched": False, "allow_added_rows": False, "mode": False, "budget": False,
             "chat_template": False}
MODES = ("grid", "search")
RULE_KEYS = {"scale": False, "layer_scales": False, "exclude": False}
EVAL_KEYS = {"prompts": True, "reward_model": True, "tp": False, "reward_tp": False, "include_sft": False,
             "sampling": False, "device": False, "max_engines": False, "swap": False, "max_model_len": False,
             "dtype": False, "trust_remote_code": False, "fail_on_long_prompts": False}
DEVICES = {"gpu": True, "cpu": False}
DTYPES = ("auto", "bfloat16", "float16", "float32")
PROMPT_KEYS = {"set": True, "limit": False, "sample": False, "seed": False, "field": False}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class SpecError(ExpoError):
    pass


@dataclass(frozen=True)
class PromptSpec:
    set: str
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    field: str | None = None


@dataclass(frozen=True)
class EvalSpec:
    prompts: tuple[PromptSpec, ...]
    reward_model: str
    tp: int = 1
    reward_tp: int = 1
    include_sft: bool = False
    sampling: dict = field(default_factory=dict)
    use_gpu: bool | None = None
    max_engines: int | None = None
    swap: bool | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    fail_on_long_prompts: bool = False

    def engine_settings(self):
        """The engine options of this evaluation, as ``expo-ray evaluate`` takes them."""
        from .evaluate.pipeline import EngineSettings

        return EngineSettings(tp=self.tp, reward_tp=self.reward_tp, use_gpu=self.use_gpu,
                              max_model_len=self.max_model_len, trust_remote_code=self.trust_remote_code,
                              max_engines=self.max_engines, dtype=self.dtype, swap=self.swap,
                              long_prompts="error" if self.fail_on_long_prompts else "skip")


@dataclass(frozen=True)
class PairSpec:
    name: str
    sft: str
    aligned: str
    alphas: tuple[float, ...]
    scale: tuple[str, ...] = ()
    layer_scales: str | None = None
    exclude: tuple[str, ...] = ()
    copy_unmatched: bool = False
    allow_added_rows: bool = False
    mode: str = "grid"
    budget: int | None = None
    chat_template: str | None = None   # Jinja text, for models whose tokenizer has no chat template

    @property
    def plan_options(self) -> dict:
        """The pair's alpha rules and policies, as :func:`expo_ray.api.make_plan` takes them."""
        return dict(scales=self.scale, layer_scales=self.layer_scales, exclude=self.exclude,
                    copy_unmatched=self.copy_unmatched, allow_added_rows=self.allow_added_rows)

    @property
    def pair_id(self) -> str:
        """Deterministic id from the inputs and settings (not from the name)."""
        return identity.pair_id(self.sft, self.aligned, self.scale, self.layer_scales, self.exclude,
                                self.copy_unmatched, self.allow_added_rows)

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.pair_id}"


@dataclass(frozen=True)
class SweepSpec:
    path: str
    destination: str
    pairs: tuple[PairSpec, ...]
    evaluation: EvalSpec | None
    chunk_mib: float = 256

    def as_dict(self) -> dict:
        return asdict(self)


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
                self.fail(where, f"{what}.{key}", f"{a} is negative (extrapolation uses alpha >= 0; alpha 0 is the aligned model)")
            else:
                out.append(float(a))
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

    def boolean(self, mapping, key, what) -> bool:
        value = mapping.get(key, False)
        if not isinstance(value, bool):
            self.fail(self.at(mapping, key), f"{what}.{key}", "must be true or false")
            return False
        return value


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
    default_alphas = c.alphas(raw, "alphas", "spec") if "alphas" in raw else (0.1, 0.2, 0.3, 0.4, 0.5)
    chunk = raw.get("chunk_mib", 256)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, float)) or not 0 < chunk <= 65536:
        c.fail(c.at(raw, "chunk_mib"), "spec.chunk_mib", "must be a positive number of MiB, at most 65536")
        chunk = 256
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
        if sft and aligned:
            pairs.append(PairSpec(name, sft, aligned, alphas, tuple(scale) if isinstance(scale, list) else (),
                                  layer_scales if isinstance(layer_scales, str) else None,
                                  tuple(exclude) if isinstance(exclude, list) else (),
                                  c.boolean(p, "copy_unmatched", what), c.boolean(p, "allow_added_rows", what),
                                  mode if mode in MODES else "grid", budget,
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
                    prompts.append(PromptSpec(ps))
                elif c.keys(ps, PROMPT_KEYS, what):
                    prompts.append(PromptSpec(c.string(ps, "set", what) or "", c.integer(ps, "limit", what, None),
                                              c.integer(ps, "sample", what, None), c.integer(ps, "seed", what, 0, 0),
                                              c.string(ps, "field", what, required=False)))
            sampling = e.get("sampling") or {}
            if c.keys(sampling, {k: False for k in SAMPLING_KEYS}, "evaluation.sampling"):
                for k, v in sampling.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                        c.fail(c.at(sampling, k), f"evaluation.sampling.{k}", "must be a non-negative number")
            device = e.get("device")
            if device is not None and device not in DEVICES:
                c.fail(c.at(e, "device"), "evaluation.device", f"{device!r}: use gpu or cpu")
            dtype = e.get("dtype", "auto")
            if dtype not in DTYPES:
                c.fail(c.at(e, "dtype"), "evaluation.dtype", f"{dtype!r}: use one of {', '.join(DTYPES)}")
            swap = e.get("swap")
            if swap is not None and not isinstance(swap, bool):
                c.fail(c.at(e, "swap"), "evaluation.swap", "must be true or false")
            evaluation = EvalSpec(tuple(prompts), c.string(e, "reward_model", "evaluation") or "",
                                  c.integer(e, "tp", "evaluation", 1), c.integer(e, "reward_tp", "evaluation", 1),
                                  c.boolean(e, "include_sft", "evaluation"), dict(sampling) if isinstance(sampling, dict) else {},
                                  DEVICES.get(device), c.integer(e, "max_engines", "evaluation", None),
                                  swap if isinstance(swap, bool) else None,
                                  c.integer(e, "max_model_len", "evaluation", None, minimum=16),
                                  dtype if dtype in DTYPES else "auto", c.boolean(e, "trust_remote_code", "evaluation"),
                                  c.boolean(e, "fail_on_long_prompts", "evaluation"))
    if evaluation is None:
        for i, p in enumerate(raw_pairs):
            if isinstance(p, dict) and p.get("mode") == "search":
                c.fail(c.at(p, "mode"), f"pairs[{i}].mode", "search needs an evaluation section (prompts, reward model)")
    if c.problems:
        raise SpecError(f"{path}: invalid sweep spec:\n  " + "\n  ".join(c.problems))
    return SweepSpec(path, destination, tuple(pairs), evaluation, float(chunk))


def load_spec(path: str) -> SweepSpec:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8") from None
    return parse_spec(text, path)
