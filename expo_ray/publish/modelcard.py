"""What a variant folder says about itself: its Hub model card (README.md) and a mergekit config.

The card's metadata follows the Hub's conventions for merges (``huggingface_hub.ModelCardData``):
``base_model`` lists both parents when they are Hub repositories, ``base_model_relation: merge``,
``library_name: transformers`` and the aligned model's licence. ``mergekit_config.yml`` is the same
model as a mergekit ``linear`` merge, weights ``1 + alpha`` (aligned) and ``-alpha`` (SFT).
"""
from __future__ import annotations

import logging
import shlex

import yaml

from .._version import __version__
from ..extrapolation.plan import COPY, EXTEND_ROWS, EXTRAPOLATE, Plan, plan_summary
from ..options import format_alpha

log = logging.getLogger(__name__)

MERGEKIT_FILE = "mergekit_config.yml"
MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
TAGS = ["merge", "expo", "model-extrapolation", "expo-ray"]
# Metadata of the aligned model's own card carried over to its variants.
INHERITED = ("license", "license_name", "license_link", "language", "pipeline_tag")


def hub_repo(uri: str) -> str | None:
    """The Hub repository id of an hf:// source (hf://org/name@rev -> org/name), else None."""
    if not uri.startswith("hf://"):
        return None
    from ..storage.hub import parse_hf_uri

    return parse_hf_uri(uri)[0]


def source_card_data(text: str | None, label: str) -> dict:
    """The metadata of the aligned model's card worth inheriting ({} when it has none or is unreadable)."""
    if not text:
        return {}
    from huggingface_hub import ModelCard  # imported when used: it takes seconds

    try:
        data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # noqa: BLE001 - a source card never stops a commit
        log.warning("%s: model card metadata not readable (%s); licence not carried over", label, exc)
        return {}
    return {k: data[k] for k in INHERITED if data.get(k)}


def canonical_command(sft: str, aligned: str, alpha: float, rules: dict, options: dict) -> str:
    """An `expo-ray extrapolate` command line that makes this variant (DST left as a placeholder)."""
    args = ["expo-ray", "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", format_alpha(alpha)]
    for pattern, factor in rules.get("scales") or []:
        args += ["--scale", f"{pattern}={factor!r}"]
    if rules.get("layer_scales"):
        args += ["--layer-scales", ",".join(repr(float(f)) for f in rules["layer_scales"])]
    for pattern in rules.get("exclude") or []:
        args += ["--exclude", pattern]
    for option, value in sorted(options.items()):
        if value is True:
            args.append("--" + option.replace("_", "-"))
    return " ".join(shlex.quote(a) for a in args) + " --out DST"


def _rule_lines(plan: Plan) -> list[str]:
    rules = plan.rules.describe()
    lines = [f"- tensors matching `{pattern}`: alpha x {factor}" for pattern, factor in rules["scales"]]
    if rules["layer_scales"]:
        early, middle, late = rules["layer_scales"]
        lines.append(f"- decoder layers by thirds: early x {early}, middle x {middle}, late x {late}")
    lines += [f"- tensors matching `{pattern}`: copied unchanged from the aligned "
              "model" for pattern in rules["exclude"]]
    return lines or ["- one alpha for every floating-point tensor"]


def model_card(plan: Plan, alpha: float, source_card: str | None = None) -> str:
    """README.md of the variant for `alpha`; `source_card` is the aligned model's README.md, if any.

    Built only from canonical values (resolved source URIs, the alpha, the rules and options), never
    from the command as typed: every spelling of one job commits the same bytes."""
    from huggingface_hub import ModelCardData

    parents = [r for r in (hub_repo(plan.aligned_uri), hub_repo(plan.sft_uri)) if r]
    data = ModelCardData(
        base_model=parents or None,
        base_model_relation="merge" if parents else None,
        library_name="transformers",
        tags=list(TAGS),
        **source_card_data(source_card, f"{plan.aligned_uri}/README.md"),
    )
    counts = ", ".join(f"{k}: {v}" for k, v in plan.counts.items() if v)
    summary = plan_summary(plan)
    rules, options = summary["rules"], summary["options"]
    body = f"""# ExPO variant, alpha = {format_alpha(alpha)}

Made by expo-ray {__version__} with weak-to-strong extrapolation (ExPO, Zheng et al. 2024):

    theta = theta_aligned + alpha * (theta_aligned - theta_sft)

Every tensor is the exact value of that formula (alpha as a float64) rounded once, to nearest-even,
into the tensor's dtype.

| | |
|---|---|
| aligned model | `{plan.aligned_uri}` |
| SFT model | `{plan.sft_uri}` |
| alpha | {format_alpha(alpha)} |
| tensors | {counts} |
| sources fingerprint | `{plan.source_fingerprint[:16]}` |

Alpha rules:
{chr(10).join(_rule_lines(plan))}

Command:

    {canonical_command(plan.sft_uri, plan.aligned_uri, alpha, rules, options)}

Config, tokenizer and generation settings are the aligned model's. `{MERGEKIT_FILE}` is the same
merge for mergekit. `manifest.json` lists every file with its size and content hash (BLAKE3); `expo-ray verify`
checks them. A folder without `manifest.json` is incomplete.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _model_ref(uri: str) -> str:
    """How mergekit names a source: org/name@revision for the Hub, else the path or URI as is."""
    if uri.startswith("hf://"):
        return uri[len("hf://"):]
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _weights(plan: Plan, alpha: float) -> tuple[object, object]:
    """mergekit `weight` settings of the aligned and SFT models: one number each when every
    floating-point tensor has the variant's alpha, else one entry per tensor (longest names first,
    because mergekit takes the first filter that is a substring of the tensor name)."""
    tensors = [t for s in plan.shards for t in s.tensors if t.action in (EXTRAPOLATE, COPY) and t.sft is not None]
    per_tensor = {t.name: (alpha * t.scale if t.action == EXTRAPOLATE else 0.0) for t in tensors}
    if all(a == alpha for a in per_tensor.values()):
        return 1.0 + alpha, -alpha
    names = sorted(per_tensor, key=lambda n: (-len(n), n))
    return ([{"filter": n, "value": 1.0 + per_tensor[n]} for n in names] + [{"value": 1.0}],
            [{"filter": n, "value": -per_tensor[n]} for n in names] + [{"value": 0.0}])


def mergekit_config(plan: Plan, alpha: float) -> str:
    """mergekit_config.yml: this variant as a mergekit `linear` merge (`mergekit-yaml FILE OUT`)."""
    aligned_w, sft_w = _weights(plan, alpha)
    config = {
        "merge_method": "linear",
        "models": [{"model": _model_ref(plan.aligned_uri), "parameters": {"weight": aligned_w}},
                   {"model": _model_ref(plan.sft_uri), "parameters": {"weight": sft_w}}],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    tensors = [t for s in plan.shards for t in s.tensors]
    dtypes = {t.dtype for t in tensors if t.action == EXTRAPOLATE}
    if len(dtypes) == 1 and next(iter(dtypes)) in MERGEKIT_DTYPES:
        config["out_dtype"] = MERGEKIT_DTYPES[dtypes.pop()]
    remote = [u for u in (plan.aligned_uri, plan.sft_uri) if u.startswith("s3://")]
    head = [f"# ExPO variant alpha = {format_alpha(alpha)} as a mergekit merge: "
            "(1 + alpha) * aligned - alpha * sft.",
            "# mergekit computes in float32 and rounds once more into out_dtype; expo-ray rounds the exact",
            "# value once, so a few values may differ in the last bit."]
    if remote:
        head.append("# mergekit reads local folders and Hub ids: copy " + " and ".join(remote) + " locally first.")
    if any(t.action == EXTEND_ROWS or t.sft is None for t in tensors):
        head.append("# Not reproducible by mergekit as is: some tensors exist (or have rows) only in the aligned "
                    "model.")
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False)
