"""What a variant of a LoRA-adapter pair holds besides its tensors, and what its manifest says.

* adapter form: ``adapter_config.json`` with the scaled ``lora_alpha`` / ``alpha_pattern`` (see
  :mod:`expo_ray.lora.plan`), the adapter's tokenizer and licence files, and a model card whose
  metadata follows the Hub's conventions for adapters (``base_model``: the SFT model,
  ``base_model_relation: adapter``, ``library_name: peft``);
* merged form: the index, the SFT model's config, the tokenizer (the adapter's when it has one),
  and a card for a merge of the SFT model and the adapter.

The manifest records ``form`` ("adapter" or "merged") and names the adapter as the aligned model.
"""
from __future__ import annotations

import json

from .._version import __version__
from ..checkpoint.folder import INDEX_FILE
from ..lora.adapter import CONFIG_FILE
from ..lora.plan import ADAPTER, LoraPlan
from ..options import format_alpha
from .modelcard import TAGS, canonical_command, hub_repo, source_card_data

MAX_SIDE_BYTES = 512 * 1024 * 1024


def lora_payload(plan: LoraPlan, alpha: float, source_card: str = "") -> dict[str, bytes]:
    """Every file of the variant for ``alpha`` other than its tensors (the manifest comes last, apart)."""
    files: dict[str, bytes] = {}
    if plan.form == ADAPTER:
        files[CONFIG_FILE] = (json.dumps(plan.config_for(alpha), indent=2, sort_keys=True) + "\n").encode()
    else:
        index = {"metadata": {"total_size": plan.model_bytes}, "weight_map": plan.weight_map()}
        files[INDEX_FILE] = (json.dumps(index, indent=2) + "\n").encode()
    sources = {s.uri: s for s in plan.sources.values()}
    for key, uri in plan.side:  # at the versions the plan pinned
        files[key] = sources[uri].read_bytes(key, limit=MAX_SIDE_BYTES)
    files["README.md"] = lora_card(plan, alpha, source_card).encode()
    return files


def lora_file_names(plan: LoraPlan) -> list[str]:
    """The names lora_payload writes (a variant folder of the plan holds these and its shards)."""
    return [CONFIG_FILE if plan.form == ADAPTER else INDEX_FILE, *(key for key, _ in plan.side), "README.md"]


def lora_command(plan: LoraPlan, alpha: float) -> str:
    """The `expo-ray extrapolate` command that makes this variant."""
    options = dict(plan.options.policies(), merge=plan.form != ADAPTER)
    return canonical_command(plan.sft_uri, plan.adapter_uri, alpha, plan.rules.describe(), options)


def lora_manifest_fields(plan: LoraPlan, alpha: float) -> dict:
    """The manifest's command, sources and form for a variant of an adapter pair."""
    return {"command": lora_command(plan, alpha),
            "sources": {"sft": plan.sft_uri, "aligned": plan.adapter_uri, "fingerprint": plan.source_fingerprint},
            "form": plan.form}


def lora_card(plan: LoraPlan, alpha: float, source_card: str = "") -> str:
    """README.md of the variant: Hub metadata, the formula, how it was computed, how to load it."""
    from huggingface_hub import ModelCardData

    sft_repo, adapter_repo = hub_repo(plan.sft_uri), hub_repo(plan.adapter_uri)
    adapter = plan.form == ADAPTER
    if adapter:
        data = ModelCardData(base_model=sft_repo, base_model_relation="adapter" if sft_repo else None,
                             library_name="peft", tags=TAGS + ["lora"],
                             **source_card_data(source_card, f"{plan.adapter_uri}/README.md"))
    else:
        parents = [r for r in (adapter_repo, sft_repo) if r]
        data = ModelCardData(base_model=parents or None, base_model_relation="merge" if parents else None,
                             library_name="transformers", tags=TAGS + ["lora"],
                             **source_card_data(source_card, f"{plan.adapter_uri}/README.md"))
    a = format_alpha(alpha)
    how = (f"""This folder is a PEFT LoRA adapter for the SFT model. Its LoRA tensors are the aligned adapter's,
bit for bit; the factor 1 + alpha is carried in `{CONFIG_FILE}` (`lora_alpha` and every `alpha_pattern`
value multiplied by it, so s becomes (1 + alpha) * s exactly as a float64), so nothing is rounded here.
Whole tensors the adapter holds (`modules_to_save`, trained biases) are theta_aligned + alpha *
(theta_aligned - theta_sft), rounded once, to nearest-even, into their dtype.

Load it with PEFT (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SFT), THIS_FOLDER)`) or
serve it with vLLM (`LLM(SFT, enable_lora=True)`, `LoRARequest("alpha_{a}", 1, THIS_FOLDER)`)."""
           if adapter else
           """Every tensor the adapter changes is theta_sft + (1 + alpha) * s * B @ A, computed in float64 in row
blocks and rounded once, to nearest-even, into the SFT tensor's dtype; the other tensors are the SFT
model's. Whole tensors the adapter holds are extrapolated against the SFT ones.""")
    body = f"""# ExPO variant of a LoRA-aligned model, alpha = {a}

Made by expo-ray {__version__} with weak-to-strong extrapolation (ExPO, Zheng et al. 2024). The aligned
model is a LoRA adapter on the SFT model, dW = s * B @ A, so

    theta(alpha) = theta_sft + (1 + alpha) * s * B @ A

{how}

| | |
|---|---|
| aligned adapter | `{plan.adapter_uri}` |
| SFT model | `{plan.sft_uri}` |
| alpha | {a} |
| form | {plan.form} |
| sources fingerprint | `{plan.source_fingerprint[:16]}` |

Command:

    {lora_command(plan, alpha)}

`manifest.json` lists every file with its size and content hash (BLAKE3); `expo-ray verify` checks them.
A folder without `manifest.json` is incomplete.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"
