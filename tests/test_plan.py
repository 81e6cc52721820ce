"""Checkpoint validation and the plan: pairing by name, policies, alpha rules (headers only)."""
import json
import shutil

import pytest

from expo_ray.checkpoint.folder import Checkpoint
from expo_ray.errors import InvalidCheckpoint, PlanError
from expo_ray.extrapolation.plan import (
    COPY,
    COPY_IDENTICAL,
    EXTEND_ROWS,
    EXTRAPOLATE,
    AlphaRules,
    build_plan,
    layer_group,
)
from expo_ray.options import PlanOptions, parse_alphas


def copy_of(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_pairs_by_name_across_different_sharding(bf16_pair):
    sft, aligned = Checkpoint.open(str(bf16_pair[0])), Checkpoint.open(str(bf16_pair[1]))
    assert sft.shards != aligned.shards and len(sft.shards) > 1 and len(aligned.shards) > 1
    plan = build_plan(sft, aligned, (0.1, 0.5))
    # Output shards mirror the aligned shards, in the aligned tensor order.
    assert [s.key for s in plan.shards] == aligned.shards
    for shard in plan.shards:
        assert [t.name for t in shard.tensors] == [i.name for i in aligned.headers[shard.key].tensors]
    for t in (t for s in plan.shards for t in s.tensors):
        assert t.sft.info.name == t.name == t.aligned.info.name
    assert plan.counts[EXTRAPOLATE] == len(aligned.tensors)


def test_alpha_rules_precedence_and_layer_groups():
    rules = AlphaRules.build(["*.mlp.*=0.5", "re:self_attn\\.q_proj=2"], "0.1,1,3", ["model.norm.weight"])
    n = 6
    assert rules.scale_for("model.norm.weight", n) == 0.0
    assert rules.scale_for("model.layers.0.mlp.up_proj.weight", n) == 0.5
    assert rules.scale_for("model.layers.5.self_attn.q_proj.weight", n) == 2.0
    assert rules.scale_for("model.layers.0.self_attn.k_proj.weight", n) == 0.1
    assert rules.scale_for("model.layers.3.self_attn.k_proj.weight", n) == 1.0
    assert rules.scale_for("model.layers.5.input_layernorm.weight", n) == 3.0
    assert rules.scale_for("model.embed_tokens.weight", n) == 1.0
    assert [layer_group(i, 32) for i in (0, 10, 11, 21, 22, 31)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(PlanError, match="PATTERN=FACTOR"):
        AlphaRules.build(["nope"])
    with pytest.raises(PlanError, match="three numbers"):
        AlphaRules.build([], "1,2")
    with pytest.raises(PlanError, match="regular expression"):
        AlphaRules.build(["re:([=1"])


def test_parse_alphas():
    assert parse_alphas("0.1, 0.3,0.5") == (0.1, 0.3, 0.5)
    for bad in ("", "0.1,x", "nan", "0.1,0.1"):
        with pytest.raises(PlanError):
            parse_alphas(bad)


def test_exclude_copies_and_tied_rules_are_checked(pair_factory):
    sft, aligned = pair_factory(dtype="bfloat16", tie_word_embeddings=True)
    s, a = Checkpoint.open(str(sft)), Checkpoint.open(str(aligned))
    assert "lm_head.weight" not in a.tensors  # tied: stored once
    plan = build_plan(s, a, (0.3,), AlphaRules.build(exclude=["*norm*"]))
    actions = {t.name: t.action for sh in plan.shards for t in sh.tensors}
    assert actions["model.norm.weight"] == COPY and actions["model.embed_tokens.weight"] == EXTRAPOLATE


def test_every_difference_is_listed(bf16_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    sft = copy_of(bf16_pair[0], tmp_path, "sft")
    aligned = copy_of(bf16_pair[1], tmp_path, "aligned")
    cfg = json.loads((aligned / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (aligned / "config.json").write_text(json.dumps(cfg))
    # Drop one tensor from the SFT model and change the shape of another.
    index = json.loads((sft / "model.safetensors.index.json").read_text())
    victim, reshaped = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    for shard in {index["weight_map"][victim], index["weight_map"][reshaped]}:
        tensors = load_file(sft / shard)
        tensors.pop(victim, None)
        if reshaped in tensors:
            tensors[reshaped] = tensors[reshaped][:, :-1].contiguous()
        save_file(tensors, sft / shard, metadata={"format": "pt"})
    del index["weight_map"][victim]
    (sft / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PlanError) as exc:
        build_plan(Checkpoint.open(str(sft)), Checkpoint.open(str(aligned)), (0.1,))
    msg = str(exc.value)
    assert "architectures" in msg and "MistralForCausalLM" in msg
    assert f"tensor {victim}: only in the aligned model" in msg and "--copy-unmatched" in msg
    assert f"tensor {reshaped}: shape" in msg
    # --copy-unmatched takes care of the missing tensor, not of the others.
    with pytest.raises(PlanError) as exc:
        build_plan(Checkpoint.open(str(sft)), Checkpoint.open(str(aligned)), (0.1,),
                   options=PlanOptions(copy_unmatched=True))
    assert "only in the aligned model" not in str(exc.value)


def test_added_rows_need_opt_in(pair_factory):
    sft, aligned = pair_factory(dtype="bfloat16", added_vocab=3)
    s, a = Checkpoint.open(str(sft)), Checkpoint.open(str(aligned))
    with pytest.raises(PlanError) as exc:
        build_plan(s, a, (0.3,))
    assert "--allow-added-rows" in str(exc.value) and "vocab_size" in str(exc.value)
    plan = build_plan(s, a, (0.3,), options=PlanOptions(allow_added_rows=True))
    extended = {t.name: t.shared_rows for sh in plan.shards for t in sh.tensors if t.action == EXTEND_ROWS}
    assert set(extended) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert set(extended.values()) == {s.config["vocab_size"]}


def test_bad_folders(bf16_pair, tmp_path):
    aligned = copy_of(bf16_pair[1], tmp_path, "a")
    index_path = aligned / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))

    index["weight_map"][name] = "model-09999-of-09999.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match="names shard 'model-09999-of-09999.safetensors', which does not exist"):
        Checkpoint.open(str(aligned))

    index["weight_map"][name] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match="outside the model folder"):
        Checkpoint.open(str(aligned))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pickled / "config.json").write_text("{}")
    with pytest.raises(InvalidCheckpoint, match="pickle checkpoints .* are never loaded.*convert it to safetensors"):
        Checkpoint.open(str(pickled))

    with pytest.raises(InvalidCheckpoint, match="no such model folder"):
        Checkpoint.open(str(tmp_path / "missing"))


def test_non_float_tensors_are_copied(tmp_path):
    import torch
    from helpers import write_checkpoint

    cfg = {"architectures": ["X"], "model_type": "x"}
    t = {"w": torch.ones(4, dtype=torch.bfloat16), "ids": torch.arange(3)}
    write_checkpoint(tmp_path / "s", t, cfg, 1 << 20)
    write_checkpoint(tmp_path / "a", {"w": t["w"] * 2, "ids": t["ids"]}, cfg, 1 << 20)
    plan = build_plan(Checkpoint.open(str(tmp_path / "s")), Checkpoint.open(str(tmp_path / "a")), (0.5,))
    assert {t.name: t.action for t in plan.shards[0].tensors} == {"w": EXTRAPOLATE, "ids": COPY_IDENTICAL}


def test_fingerprint_follows_content_not_only_headers(bf16_pair, tmp_path):
    """Two fine-tunes of one architecture have identical headers; their fingerprints (which key
    resume receipts, evaluation caches and the local model cache) must still differ."""
    import os

    from expo_ray.checkpoint.identity import checkpoint_fingerprint

    _, aligned = bf16_pair
    copy = tmp_path / "copy"
    shutil.copytree(aligned, copy)  # copy2: same bytes and mtimes -> same identity
    assert checkpoint_fingerprint(Checkpoint.open(str(copy))) == checkpoint_fingerprint(Checkpoint.open(str(aligned)))
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # another weight value, same header
    shard.write_bytes(bytes(data))
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert checkpoint_fingerprint(Checkpoint.open(str(copy))) != checkpoint_fingerprint(Checkpoint.open(str(aligned)))


def test_lineage_reports_the_real_error_when_a_shard_cannot_be_opened(bf16_pair, tmp_path):
    import shutil

    from expo_ray.api import make_plan
    from expo_ray.errors import StorageError
    from expo_ray.extrapolation.lineage import shard_sums

    sft, aligned = bf16_pair
    copy = tmp_path / "aligned"
    shutil.copytree(aligned, copy)
    plan = make_plan(str(sft), str(copy), [0.5])
    shard = plan.shards[0]
    (copy / shard.key).unlink()
    with pytest.raises(StorageError):  # not an UnboundLocalError from the cleanup
        shard_sums(shard, plan.sources["sft"], plan.sources["aligned"])


def test_config_defaults_are_transformers_defaults():
    """The table of keys whose absence means a default is transformers' own, for every model type
    in it: a config of that type built with the key left out gets the value the table gives."""
    transformers = pytest.importorskip("transformers")
    from expo_ray.checkpoint.config_defaults import DEFAULTS, filled

    for model_type in DEFAULTS:
        config = transformers.CONFIG_MAPPING[model_type](hidden_size=512, num_attention_heads=4)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        ours = filled({"model_type": model_type, "hidden_size": 512, "num_attention_heads": 4})
        assert (ours["head_dim"], ours["num_key_value_heads"], ours["tie_word_embeddings"]) == (
            head_dim, config.num_key_value_heads, config.tie_word_embeddings), model_type
    written = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 4, "head_dim": 64,
               "num_key_value_heads": 1, "tie_word_embeddings": True}
    assert filled(written) == written and filled({"model_type": "unknown", "hidden_size": 1}) == {
        "model_type": "unknown", "hidden_size": 1}
