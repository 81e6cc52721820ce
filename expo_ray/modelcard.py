"""The README.md model card written into every variant folder."""
from __future__ import annotations

import json

from . import __version__
from .plan import Plan, format_alpha


def model_card(plan: Plan, alpha: float, command: str | None) -> str:
    rules = plan.rules.describe()
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
    counts = ", ".join(f"{k}: {v}" for k, v in plan.counts.items() if v)
    return f"""---
tags:
- expo
- model-extrapolation
- expo-ray
base_model: {json.dumps(plan.aligned_uri)}
---
# ExPO variant, alpha = {format_alpha(alpha)}

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
{chr(10).join(rule_lines)}

Command:

    {command or "(library call)"}

Config, tokenizer and generation settings are the aligned model's. `manifest.json` lists every file
with its size and content hash (BLAKE3); `expo-ray verify` checks them. A folder without `manifest.json` is incomplete.
"""
