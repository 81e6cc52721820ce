"""Variant folders fit the ecosystem: a Hub model card, the aligned model's licence and code files,
and a mergekit config that mergekit itself runs to the same weights."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_tensors
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from expo_ray.api import extrapolate, make_plan
from expo_ray.publish.modelcard import MERGEKIT_FILE, mergekit_config, model_card

SOURCE_CARD = """---
license: apache-2.0
language:
- en
tags:
- dpo
---
# The aligned model
"""
ZEPHYR = "hf://HuggingFaceH4/zephyr-7b-beta@892b3d7a7b1cf10c7a701c8f0a6fdf88e7c5a5bb"
ZEPHYR_SFT = "hf://HuggingFaceH4/mistral-7b-sft-beta@3d8b6d8f1d7d4ef6e1d55b2f1f2e0bd6a8a3f6e1"


@pytest.fixture(scope="module")
def aligned_with_side_files(bf16_pair, tmp_path_factory):
    """The aligned model as published: its own card, licence files and remote code (auto_map)."""
    sft_dir, aligned_dir = bf16_pair
    folder = tmp_path_factory.mktemp("published") / "aligned"
    shutil.copytree(aligned_dir, folder)
    (folder / "README.md").write_text(SOURCE_CARD)
    (folder / "LICENSE.txt").write_text("license text\n")
    (folder / "NOTICE").write_text("notice\n")
    (folder / "USE_POLICY.md").write_text("use policy\n")
    (folder / "modeling_custom.py").write_text("# model code\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return sft_dir, folder


def test_card_loads_with_hub_metadata_and_side_files_are_copied(ray_local, aligned_with_side_files, tmp_path):
    sft_dir, aligned_dir = aligned_with_side_files
    extrapolate(str(sft_dir), str(aligned_dir), (0.3,), str(tmp_path), show_progress=False)
    variant = tmp_path / "alpha_0.3"
    for name in ("LICENSE.txt", "NOTICE", "USE_POLICY.md", "modeling_custom.py"):
        assert (variant / name).read_bytes() == (aligned_dir / name).read_bytes(), name
    card = ModelCard.load(variant / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == ["en"], data
    assert data["library_name"] == "transformers"
    assert {"merge", "expo"} <= set(data["tags"])
    # Local folders are not Hub ids: the card names no base_model rather than a path.
    assert "base_model" not in data and "base_model_relation" not in data, data
    assert "alpha = 0.3" in card.text and "expo-ray extrapolate --sft" in card.text
    # The manifest covers the new files.
    listed = {f["path"] for f in json.loads((variant / "manifest.json").read_text())["files"]}
    assert {"LICENSE.txt", "NOTICE", "USE_POLICY.md", "modeling_custom.py", MERGEKIT_FILE, "README.md"} <= listed


def test_card_lists_both_hub_parents_as_a_merge(bf16_pair, tmp_path):
    sft_dir, aligned_dir = bf16_pair
    plan = dataclasses.replace(make_plan(str(sft_dir), str(aligned_dir), (0.5,)), aligned_uri=ZEPHYR,
                               sft_uri=ZEPHYR_SFT)
    (tmp_path / "README.md").write_text(model_card(plan, 0.5, SOURCE_CARD))
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == ["HuggingFaceH4/zephyr-7b-beta", "HuggingFaceH4/mistral-7b-sft-beta"]
    for repo in data["base_model"]:
        validate_repo_id(repo)
    assert data["base_model_relation"] == "merge" and data["license"] == "apache-2.0"
    config = yaml.safe_load(mergekit_config(plan, 0.5))
    assert [m["model"] for m in config["models"]] == [ZEPHYR[5:], ZEPHYR_SFT[5:]]
    mergekit_config_cls = pytest.importorskip("mergekit.config").MergeConfiguration
    refs = [m.model.model for m in mergekit_config_cls.model_validate(config).models]
    assert [(r.path, r.revision) for r in refs] == [tuple(u[5:].split("@")) for u in (ZEPHYR, ZEPHYR_SFT)]


def _mergekit(config_text: str, out: Path) -> dict[str, torch.Tensor]:
    """Run mergekit itself (what `mergekit-yaml CONFIG OUT` runs) and load what it wrote."""
    mergekit = pytest.importorskip("mergekit", reason="mergekit is in the test extra")  # noqa: F841
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config_text)), str(out),
              options=MergeOptions(copy_tokenizer=False))
    return load_tensors(out)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


@pytest.mark.parametrize("rules", [{}, {"layer_scales": "0.5,0,0", "exclude": ["lm_head.weight"]}],
                         ids=["uniform", "per-tensor"])
def test_mergekit_config_reproduces_the_variant(ray_local, bf16_pair, tmp_path, rules):
    sft_dir, aligned_dir = bf16_pair
    extrapolate(str(sft_dir), str(aligned_dir), (0.5,), str(tmp_path / "expo"), show_progress=False, **rules)
    variant = tmp_path / "expo" / "alpha_0.5"
    config_text = (variant / MERGEKIT_FILE).read_text()
    config = yaml.safe_load(config_text)
    assert config["merge_method"] == "linear" and config["parameters"] == {"normalize": False}
    assert [m["model"] for m in config["models"]] == [str(aligned_dir), str(sft_dir)]
    if not rules:
        assert [m["parameters"]["weight"] for m in config["models"]] == [1.5, -0.5]
    if not rules:
        # mergekit's own loader accepts it; running it is checked once, on the per-tensor case.
        from mergekit.config import MergeConfiguration

        MergeConfiguration.model_validate(config)
        return
    ours = load_tensors(variant)
    theirs = _mergekit(config_text, tmp_path / "mergekit")
    assert sorted(theirs) == sorted(ours)
    # mergekit rounds twice (float32, then bfloat16): at most one unit in the last place apart.
    worst = {name: _ulps(ours[name], theirs[name]) for name in ours}
    assert max(worst.values()) <= 1, {k: v for k, v in worst.items() if v > 1}
    # The excluded tensor is the aligned one, in both; so is layer 1 of 2 (middle third, x0).
    aligned = load_tensors(aligned_dir)
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(ours[name], aligned[name]) and torch.equal(theirs[name], aligned[name]), name
