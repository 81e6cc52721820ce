"""The README.md model card written into every variant folder.

Built only from canonical values (resolved source URIs, the alpha, the rules and options), never
from the command as typed: every spelling of one job commits the same bytes.
"""
from __future__ import annotations

import json
import shlex

from . import __version__
from .plan import format_alpha


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


def model_card(*, sft: str, aligned: str, alpha: float, rules: dict, options: dict, tensors: dict,
               fingerprint: str) -> str:
    """The card for one variant; every argument is a canonical value (see the module docstring)."""
    rule_lines = []
    for pattern, factor in rules["scales"]:
        rule_lines.append(f"- tensors matching `{pattern}`: alpha x {factor}")
    if rules["layer_scales"]:
        e, m, l = rules["layer_scales"]
        rule_lines.append(f"- decoder layers by thirds: early x {e}, middle x {m}, late x {l}")
    for pattern in rules["exclude"]:
        rule_lines.append(f"- tensors matching `{pattern}`: copied unchanged from the aligned model")
    if not rule_lines:
        rule_lines.append("- one alpha for every floating-point tensor")
    counts = ", ".join(f"{k}: {v}" for k, v in tensors.items() if v)
    return f"""---
tags:
- expo
- model-extrapolation
- expo-ray
base_model: {json.dumps(aligned)}
---
# ExPO variant, alpha = {format_alpha(alpha)}

Made by expo-ray {__version__} with weak-to-strong extrapolation (ExPO, Zheng et al. 2024):

    theta = theta_aligned + alpha * (theta_aligned - theta_sft)

Every tensor is the exact value of that formula (alpha as a float64) rounded once, to nearest-even,
into the tensor's dtype.

| | |
|---|---|
| aligned model | `{aligned}` |
| SFT model | `{sft}` |
| alpha | {format_alpha(alpha)} |
| tensors | {counts} |
| sources fingerprint | `{fingerprint[:16]}` |

Alpha rules:
{chr(10).join(rule_lines)}

Command:

    {canonical_command(sft, aligned, alpha, rules, options)}

Config, tokenizer and generation settings are the aligned model's. `manifest.json` lists every file
with its size and content hash (BLAKE3); `expo-ray verify` checks them. A folder without `manifest.json` is incomplete.
"""
