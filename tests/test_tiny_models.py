"""The tiny checkpoints that tests and ``expo-ray demo`` build are real Hugging Face models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import build_pair, build_unrelated, load_tensors, shard_names, write_checkpoint  # noqa: E402

from expo_ray.demo.tiny import CHAT_TEMPLATE, build_tiny_pair, build_tokenizer  # noqa: E402

ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def weight_map(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("pair"), seed=0)


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    return build_tiny_pair(
        tmp_path_factory.mktemp("tied"), arch="mistral", dtype="float16",
        tie_word_embeddings=True, seed=1,
    )


def test_pair_loads_with_transformers(pair):
    from transformers import AutoModelForCausalLM

    sft_dir, aligned_dir = pair
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    aligned = AutoModelForCausalLM.from_pretrained(aligned_dir)
    assert type(sft).__name__ == "LlamaForCausalLM" == type(aligned).__name__
    assert sft.dtype == torch.bfloat16 == aligned.dtype
    assert sft.config.head_dim >= 32
    s, a = sft.state_dict(), aligned.state_dict()
    assert s.keys() == a.keys()
    changed = 0
    for name in s:
        assert s[name].shape == a[name].shape
        diff = (a[name].float() - s[name].float()).abs()
        scale = s[name].float().abs().max()
        assert diff.max() <= 0.1 * scale + 1e-6, name  # small, DPO-like delta
        changed += int(diff.max() > 0)
    assert changed == len(s)  # every tensor moved
    # A real forward pass and a few greedy tokens.
    ids = torch.tensor([[1, 10, 20, 30]])
    out = aligned.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_shards_differ(pair):
    sft_dir, aligned_dir = pair
    ws, wa = weight_map(sft_dir), weight_map(aligned_dir)
    assert ws.keys() == wa.keys()
    ns, na = len(set(ws.values())), len(set(wa.values()))
    assert ns >= 2 and na >= 2 and ns != na
    # Tensors are paired by name, never by position: the (shard, position) layout differs.
    layout_s = {k: (v, i) for v in set(ws.values()) for i, k in enumerate(header(sft_dir / v)) if k in ws}
    layout_a = {k: (v, i) for v in set(wa.values()) for i, k in enumerate(header(aligned_dir / v)) if k in wa}
    assert layout_s != layout_a
    for d in pair:
        for fname in set(weight_map(d).values()):
            assert (d / fname).is_file()
        assert (d / "generation_config.json").is_file()
        assert (d / "config.json").is_file()


def test_tied_embeddings_really_tied(tied_pair):
    from transformers import AutoModelForCausalLM

    for d in tied_pair:
        assert "lm_head.weight" not in weight_map(d)
        assert "lm_head.weight" not in load_tensors(d)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is True
        assert cfg["architectures"] == ["MistralForCausalLM"]
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.dtype == torch.float16
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtypes_as_asked(tmp_path, dtype):
    sft_dir, aligned_dir = build_tiny_pair(tmp_path, dtype=dtype, seed=2)
    for d in (sft_dir, aligned_dir):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype
        for fname in set(weight_map(d).values()):
            h = header(d / fname)
            h.pop("__metadata__", None)
            assert {v["dtype"] for v in h.values()} == {ST_DTYPE[dtype]}


def test_deterministic_from_seed(tmp_path, pair):
    again = build_tiny_pair(tmp_path / "again", seed=0)
    other = build_tiny_pair(tmp_path / "other", seed=5)
    for a, b, c in zip(pair, again, other):
        ta, tb, tc = load_tensors(a), load_tensors(b), load_tensors(c)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not torch.equal(ta["model.embed_tokens.weight"], tc["model.embed_tokens.weight"])
        assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_added_vocab(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft_dir, aligned_dir = build_pair(tmp_path, added_vocab=3, seed=3)
    s, a = load_tensors(sft_dir), load_tensors(aligned_dir)
    v = s["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert a[name].shape[0] == v + 3
        assert a[name].shape[1] == s[name].shape[1]
    assert json.loads((aligned_dir / "config.json").read_text())["vocab_size"] == v + 3
    tok_a = AutoTokenizer.from_pretrained(aligned_dir)
    tok_s = AutoTokenizer.from_pretrained(sft_dir)
    assert len(tok_s) == v and len(tok_a) == v + 3
    assert tok_a.convert_tokens_to_ids("<|extra_0|>") == v
    assert AutoModelForCausalLM.from_pretrained(aligned_dir).config.vocab_size == v + 3


def test_tokenizer_round_trip_and_chat_template(tmp_path, pair):
    from transformers import AutoTokenizer

    tok_dir = build_tokenizer(tmp_path / "tok", vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        assert (tok_dir / name).is_file()
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (tok_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE

    for d in (tok_dir, pair[0]):
        tok = AutoTokenizer.from_pretrained(d)
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        text = "Hello, world! Ünïcödé text, tabs\tand\nnewlines: 3.14 + 42 = ?"
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
        ]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"
        enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        chat_ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        assert chat_ids[0] == tok.bos_token_id and chat_ids[1] != tok.bos_token_id  # no double BOS
        assert tok.decode(chat_ids) == prompt
        assert tok.convert_tokens_to_ids("<|assistant|>") == chat_ids[-2]


def test_unrelated_model(tmp_path, pair):
    other = build_unrelated(tmp_path / "unrelated")
    s, u = load_tensors(pair[0]), load_tensors(other)
    assert s.keys() == u.keys()
    for k in s:
        assert s[k].shape == u[k].shape and s[k].dtype == u[k].dtype
    a = s["model.layers.0.mlp.up_proj.weight"].float().flatten()
    b = u["model.layers.0.mlp.up_proj.weight"].float().flatten()
    assert abs(torch.nn.functional.cosine_similarity(a, b, dim=0)) < 0.1


def test_write_checkpoint(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((10, 10), float(i), dtype=torch.bfloat16)
               for i in range(5)}  # 200 bytes each
    out = write_checkpoint(tmp_path / "ckpt", tensors, {"model_type": "llama"}, 450)
    wm = weight_map(out)
    assert sorted(set(wm.values())) == shard_names(3)
    assert list(wm) == list(tensors)  # order kept
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 1000
    got = load_tensors(out)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
    single = write_checkpoint(tmp_path / "one", tensors, None, 10**6)
    assert (single / "model.safetensors").is_file()
    assert not (single / "model.safetensors.index.json").exists()
