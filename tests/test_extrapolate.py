"""End to end on a real local Ray: every output tensor equals the float64 reference rounded once."""
import json

import pytest
import torch
from helpers import load_tensors, same_bits
from reference import reference

from expo_ray.api import extrapolate
from expo_ray.errors import ExpoError
from expo_ray.publish.manifest import verify_variant
from expo_ray.storage import LocalStorage

ALPHAS = (0.0, 0.1, 0.5, 2.0)
SMALL_CHUNKS = 0.0625  # MiB: forces several chunks per tensor


@pytest.mark.parametrize("dtype,tied", [("bfloat16", True), ("float16", False), ("float32", False)])
def test_outputs_equal_reference(ray_local, pair_factory, tmp_path, dtype, tied):
    sft_dir, aligned_dir = pair_factory(dtype=dtype, tie_word_embeddings=tied)
    result = extrapolate(str(sft_dir), str(aligned_dir), ALPHAS, str(tmp_path / "out"),
                         chunk_mib=SMALL_CHUNKS, show_progress=False)
    assert set(result.variants.values()) == {"written"}
    sft, aligned = load_tensors(sft_dir), load_tensors(aligned_dir)
    for alpha in ALPHAS:
        folder = tmp_path / "out" / f"alpha_{alpha!r}"
        assert verify_variant(LocalStorage(folder)).ok
        out = load_tensors(folder)
        assert list(out) == list(aligned)
        for name, x1 in aligned.items():
            ref = reference(x1, sft[name], alpha)
            assert same_bits(out[name], ref), (alpha, name)
        # The variant mirrors the aligned shards and carries config/tokenizer/model card/manifest.
        assert (sorted(p.name for p in folder.glob("*.safetensors"))
                == sorted(p.name for p in aligned_dir.glob("*.safetensors")))
        for f in ("config.json", "tokenizer.json", "generation_config.json", "README.md", "manifest.json",
                  "model.safetensors.index.json"):
            assert (folder / f).is_file(), f
    # alpha = 0 reproduces the aligned model byte for byte (tensor data; headers add provenance).
    zero = tmp_path / "out" / "alpha_0.0"
    for shard in aligned_dir.glob("*.safetensors"):
        a, b = shard.read_bytes(), (zero / shard.name).read_bytes()
        a_len, b_len = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
        assert a[8 + a_len:] == b[8 + b_len:]


def test_variant_loads_with_transformers_and_gives_reference_logits(ray_local, bf16_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    sft_dir, aligned_dir = bf16_pair
    extrapolate(str(sft_dir), str(aligned_dir), (0.3,), str(tmp_path), show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "alpha_0.3")
    expected = AutoModelForCausalLM.from_pretrained(aligned_dir)
    sft, aligned = load_tensors(sft_dir), load_tensors(aligned_dir)
    expected.load_state_dict({n: reference(t, sft[n], 0.3) for n, t in aligned.items()}, strict=False)
    ids = torch.tensor([[1, 7, 42, 99, 3, 5]])
    with torch.no_grad():
        got, want, base = (model(ids).logits, expected(ids).logits,
                           AutoModelForCausalLM.from_pretrained(aligned_dir)(ids).logits)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)


def test_rerun_skips_and_other_settings_are_refused(ray_local, bf16_pair, tmp_path):
    sft_dir, aligned_dir = bf16_pair
    extrapolate(str(sft_dir), str(aligned_dir), (0.2,), str(tmp_path), show_progress=False)
    before = (tmp_path / "alpha_0.2" / "manifest.json").read_bytes()
    again = extrapolate(str(sft_dir), str(aligned_dir), (0.2,), str(tmp_path), show_progress=False)
    assert again.variants == {"alpha_0.2": "already complete"}
    assert (tmp_path / "alpha_0.2" / "manifest.json").read_bytes() == before
    with pytest.raises(ExpoError, match="made from other inputs or settings"):
        extrapolate(str(sft_dir), str(aligned_dir), (0.2,), str(tmp_path), show_progress=False,
                    exclude=["*norm*"])


def test_rules_and_added_rows(ray_local, pair_factory, tmp_path):
    sft_dir, aligned_dir = pair_factory(dtype="bfloat16", added_vocab=4)
    extrapolate(str(sft_dir), str(aligned_dir), (0.4,), str(tmp_path), show_progress=False, chunk_mib=SMALL_CHUNKS,
                allow_added_rows=True, layer_scales="0.5,1,2", scales=["*.mlp.*=3"], exclude=["model.norm.weight"])
    sft, aligned = load_tensors(sft_dir), load_tensors(aligned_dir)
    out = load_tensors(tmp_path / "alpha_0.4")
    assert same_bits(out["model.norm.weight"], aligned["model.norm.weight"])
    assert same_bits(out["model.layers.0.mlp.up_proj.weight"],
                     reference(aligned["model.layers.0.mlp.up_proj.weight"], sft["model.layers.0.mlp.up_proj.weight"],
                               0.4 * 3))
    assert same_bits(out["model.layers.0.self_attn.q_proj.weight"],
                     reference(aligned["model.layers.0.self_attn.q_proj.weight"],
                               sft["model.layers.0.self_attn.q_proj.weight"], 0.4 * 0.5))
    # 2 layers: layer 1 is in the middle third
    assert same_bits(out["model.layers.1.self_attn.q_proj.weight"],
                     reference(aligned["model.layers.1.self_attn.q_proj.weight"],
                               sft["model.layers.1.self_attn.q_proj.weight"], 0.4))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = sft[name].shape[0]
        assert same_bits(out[name][:rows], reference(aligned[name][:rows], sft[name], 0.4))
        assert same_bits(out[name][rows:], aligned[name][rows:])
    manifest = json.loads((tmp_path / "alpha_0.4" / "manifest.json").read_text())
    assert manifest["rules"]["layer_scales"] == [0.5, 1.0, 2.0] and manifest["options"]["allow_added_rows"]


def test_non_float_difference_fails_without_a_variant(ray_local, tmp_path):
    from helpers import write_checkpoint

    cfg = {"architectures": ["X"], "model_type": "x"}
    w = torch.ones(4, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "s", {"w": w, "ids": torch.arange(3)}, cfg, 1 << 20)
    write_checkpoint(tmp_path / "a", {"w": w * 2, "ids": torch.arange(3) + 1}, cfg, 1 << 20)
    with pytest.raises(ExpoError, match="tensor ids .* differs between the SFT and aligned models"):
        extrapolate(str(tmp_path / "s"), str(tmp_path / "a"), (0.5,), str(tmp_path / "out"), show_progress=False)
    assert not verify_variant(LocalStorage(tmp_path / "out" / "alpha_0.5")).ok
    assert not list((tmp_path / "out").rglob("*.safetensors"))
