"""Aligned models that are PEFT LoRA adapters: adapter variants, merged variants, validation.

Tiny SFT models and adapters built with PEFT here (rank and alpha patterns, rsLoRA,
layers_to_transform, embedding LoRA, modules_to_save, trained and LoRA biases, GPT-2's Conv1D
with fan_in_fan_out); variants written on a real local Ray, to local folders and a real S3 server.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import build_adapter, load_tensors, make_bucket, same_bits, upload_folder
from reference import reference, round_once
from safetensors.torch import load_file, save_file

from expo_ray.cli import main
from expo_ray.errors import ExpoError
from expo_ray.lora.plan import make_plan
from expo_ray.options import PlanOptions
from expo_ray.publish.manifest import read_manifest, verify_variant
from expo_ray.publish.run import run_plan
from expo_ray.storage import open_storage

ALPHAS = (0.0, 0.3, 1.5)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _biased_llama(out: Path) -> Path:
    """A tiny float32 Llama whose attention projections have biases (what bias=all / lora_bias train)."""
    from transformers import AutoModelForCausalLM

    from expo_ray.demo.tiny import build_tokenizer, tiny_config

    config = tiny_config(dtype="float32")
    config.attention_bias = True
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(out)
    build_tokenizer(out, vocab_size=config.vocab_size)
    return out


def _gpt2(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(8)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=1)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """SFT models and the adapters trained on them (name -> (sft, adapter))."""
    from expo_ray.demo.tiny import build_tiny_pair

    root = tmp_path_factory.mktemp("lora")
    sft32, _ = build_tiny_pair(root / "p32", dtype="float32", seed=3)
    sft16, _ = build_tiny_pair(root / "p16", dtype="bfloat16", seed=4)
    biased, gpt2 = _biased_llama(root / "biased"), _gpt2(root / "gpt2")
    return {
        "patterns": (sft32, build_adapter(sft32, root / "a-patterns", seed=1, r=8, lora_alpha=16,
                                          target_modules=ALL_LINEAR, rank_pattern={"down_proj": 4, "q_proj": 2},
                                          alpha_pattern={"v_proj": 3, "gate_proj": 24}, use_rslora=True,
                                          layers_to_transform=[1])),
        "embed": (sft32, build_adapter(sft32, root / "a-embed", seed=2, r=4, lora_alpha=8,
                                       target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])),
        "bias": (biased, build_adapter(biased, root / "a-bias", seed=3, r=4, lora_alpha=4,
                                       target_modules=["q_proj", "v_proj"], bias="all", lora_bias=True)),
        "gpt2": (gpt2, build_adapter(gpt2, root / "a-gpt2", seed=4, r=2, lora_alpha=4, target_modules=["c_attn"],
                                     fan_in_fan_out=True)),
        "bf16": (sft16, build_adapter(sft16, root / "a-bf16", seed=5, r=4, lora_alpha=8, autocast=False,
                                      target_modules=["q_proj", "up_proj", "lm_head"])),
    }


def _peft(sft, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


def _lora_layers(peft_model) -> dict[str, object]:
    """module name (as in the adapter file) -> PEFT LoRA layer."""
    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def _write(plan, out: Path) -> Path:
    run_plan(plan, str(out), show_progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Adapter variants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["patterns", "embed", "bias", "gpt2", "bf16"])
def test_adapter_variants_scale_the_delta_exactly(models, name, tmp_path, ray_local):
    """Each alpha's adapter: the same LoRA tensors, bit for bit, and (per PEFT itself) the scale
    s' = (1 + alpha) * s of every module, so its delta is (1 + alpha) * s * B @ A with nothing
    rounded; whole tensors are theta_aligned + alpha * (theta_aligned - theta_sft) rounded once."""
    sft, adapter = models[name]
    out = _write(make_plan(str(sft), str(adapter), ALPHAS), tmp_path / "out")
    source = load_file(adapter / "adapter_model.safetensors")
    base = load_tensors(sft)
    reference_layers = _lora_layers(_peft(sft, adapter))
    for alpha in ALPHAS:
        variant = out / f"alpha_{alpha!r}"
        assert verify_variant(open_storage(str(variant))).ok
        assert read_manifest(open_storage(str(variant)))["form"] == "adapter"
        written = load_file(variant / "adapter_model.safetensors")
        assert list(written) == list(source)
        layers = _lora_layers(_peft(sft, variant))
        assert set(layers) == set(reference_layers)
        for module, layer in layers.items():
            want = (1 + alpha) * reference_layers[module].scaling["default"]
            assert layer.scaling["default"] == pytest.approx(want, rel=1e-15, abs=0), module
        for key, tensor in written.items():
            stem = key.removeprefix("base_model.model.")
            if ".lora_" in stem:
                assert torch.equal(tensor, source[key]), key
                continue
            base_name = stem.replace(".base_layer.", ".")  # a whole tensor: the kernel against the SFT one
            assert same_bits(tensor, reference(source[key], base[base_name], alpha)), key


# ---------------------------------------------------------------------------------------------
# Merged variants
# ---------------------------------------------------------------------------------------------


def _delta64(layer, transposed: bool) -> np.ndarray:
    a = layer.lora_A["default"].weight.detach().double() if "default" in layer.lora_A else None
    if a is None:  # an embedding LoRA
        a, b = layer.lora_embedding_A["default"].detach().double(), layer.lora_embedding_B["default"].detach().double()
        return (b @ a).T.numpy() * layer.scaling["default"]
    b = layer.lora_B["default"].weight.detach().double()
    d = (b @ a).numpy() * layer.scaling["default"]
    return d.T if transposed else d


def _ulps(got: torch.Tensor, want: torch.Tensor) -> np.ndarray:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[got.dtype]
    return (got.view(ints).long() - want.view(ints).long()).abs().numpy()


@pytest.mark.parametrize("name", ["patterns", "embed", "bias", "gpt2", "bf16"])
def test_merged_variants_are_the_float64_reference_rounded_once(models, name, tmp_path, ray_local):
    """--merge: every changed tensor equals theta_sft + (1 + alpha) * s * B @ A computed in float64
    and rounded once (an independent reference), up to one ulp where the float64 value lies within
    float64 error of a rounding midpoint; untouched tensors are the SFT model's bytes."""
    sft, adapter = models[name]
    out = _write(make_plan(str(sft), str(adapter), ALPHAS, PlanOptions(merge=True)), tmp_path / "out")
    base = load_tensors(sft)
    source = load_file(adapter / "adapter_model.safetensors")
    layers = _lora_layers(_peft(sft, adapter))
    transposed = name == "gpt2"
    off = total = 0
    for alpha in ALPHAS:
        variant = out / f"alpha_{alpha!r}"
        assert verify_variant(open_storage(str(variant))).ok
        merged = load_tensors(variant)
        assert set(merged) == set(base)
        for tensor_name, got in merged.items():
            module = tensor_name.rsplit(".", 1)[0]
            whole = source.get(f"base_model.model.{tensor_name}",
                               source.get(f"base_model.model.{module}.base_layer.{tensor_name.rsplit('.', 1)[1]}"))
            sft64 = base[tensor_name].double().numpy()
            layer = layers.get(module)
            lora_weight = layer is not None and tensor_name.endswith(".weight")
            lora_bias = layer is not None and tensor_name.endswith(".bias") and "default" in layer.lora_B \
                and layer.lora_B["default"].bias is not None
            if whole is not None and not (lora_weight or lora_bias):  # modules_to_save, biases: the exact kernel
                assert same_bits(got, reference(whole, base[tensor_name], alpha)), (tensor_name, alpha)
                continue
            value = sft64 if whole is None else \
                whole.double().numpy() + alpha * (whole.double().numpy() - sft64)
            changed = whole is not None or lora_weight or lora_bias
            if lora_weight:
                value = value + (1 + alpha) * _delta64(layer, transposed)
            if lora_bias:
                bias = layer.lora_B["default"].bias.detach().double().numpy()
                value = value + (1 + alpha) * layer.scaling["default"] * bias
            if not changed:
                assert torch.equal(got, base[tensor_name]), tensor_name
                continue
            want = torch.from_numpy(round_once(value, got.dtype)).to(got.dtype)
            ulps = _ulps(got, want)
            assert ulps.max() <= 1, (tensor_name, alpha)
            off, total = off + int((ulps > 0).sum()), total + ulps.size
    print(f"[lora merge] {name}: {off} of {total} values one ulp from the float64 reference")
    assert off <= total * 1e-4


@pytest.mark.parametrize("name", ["patterns", "embed", "bias", "gpt2"])
def test_peft_on_an_adapter_variant_equals_the_merged_variant(models, name, tmp_path, ray_local):
    """PEFT with alpha's adapter on the SFT model computes the logits of alpha's merged variant."""
    from transformers import AutoModelForCausalLM

    sft, adapter = models[name]
    alpha = 0.5
    adapters = _write(make_plan(str(sft), str(adapter), (alpha,)), tmp_path / "adapters")
    merged = _write(make_plan(str(sft), str(adapter), (alpha,), PlanOptions(merge=True)), tmp_path / "merged")
    ids = torch.tensor([[3, 17, 42, 9, 5, 77, 21, 64, 2, 11]])
    with torch.no_grad():
        with_peft = _peft(sft, adapters / "alpha_0.5")(ids).logits
        full = AutoModelForCausalLM.from_pretrained(merged / "alpha_0.5", dtype=torch.float32)(ids).logits
    assert (with_peft - full).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Bad adapters, S3, resume, lineage
# ---------------------------------------------------------------------------------------------


def _edited(adapter: Path, dest: Path, config=None, tensors=None) -> Path:
    shutil.copytree(adapter, dest)
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        cfg.update(config)
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        data = load_file(dest / "adapter_model.safetensors")
        tensors(data)
        save_file(data, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest


def test_bad_adapters_get_one_line_and_nothing_is_written(models, tmp_path):
    sft, adapter = models["patterns"]
    gpt2, _ = models["gpt2"]
    first_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def quantize(t):
        t[first_b] = t[first_b].to(torch.int8)

    def dora(t):
        t["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)

    pickled = _edited(adapter, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases = {
        "use_dora is set": _edited(adapter, tmp_path / "dora", {"use_dora": True}),
        "peft_type is 'IA3'": _edited(adapter, tmp_path / "ia3", {"peft_type": "IA3"}),
        "a quantized adapter is not supported": _edited(adapter, tmp_path / "int8", tensors=quantize),
        "lora_magnitude_vector is neither a LoRA matrix": _edited(adapter, tmp_path / "magnitude", tensors=dora),
        "init_lora_weights is 'pissa'": _edited(adapter, tmp_path / "pissa", {"init_lora_weights": "pissa"}),
        "pickle adapters are never loaded": pickled,
        "but the config gives it r = ": _edited(adapter, tmp_path / "rank", {"rank_pattern": {"o_proj": 3}}),
    }
    runner = CliRunner()
    for expected, bad in cases.items():
        out = tmp_path / f"out-{bad.name}"
        result = runner.invoke(main, ["extrapolate", "--sft", str(sft), "--aligned", str(bad), "--alpha", "0.5",
                                      "--out", str(out)])
        assert result.exit_code == 1, (bad.name, result.output)
        lines = [line for line in result.output.splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (bad.name, result.output)
        assert not out.exists(), bad.name
    with pytest.raises(ExpoError) as err:  # made for another model: named, with the first shape problem
        make_plan(str(gpt2), str(adapter), (0.5,))
    assert "\n" not in str(err.value)
    assert f"made for {sft}" in str(err.value) and "the SFT model has no tensor" in str(err.value)


def test_s3_in_and_out_resume_and_verify(models, tmp_path, ray_local, s3_client):
    """An adapter read from S3, adapter and merged variants written to S3; a re-run skips what is
    committed, a variant whose manifest is gone is written again, verify passes."""
    sft, adapter = models["embed"]
    source = upload_folder(s3_client, adapter, "lora-in", "embed-adapter")
    make_bucket(s3_client, "lora-out")
    for merge, prefix in ((None, "adapters"), (True, "merged")):
        out = f"s3://lora-out/{prefix}"
        plan = make_plan(str(sft), source, (0.0, 0.5), PlanOptions(merge=merge))
        first = run_plan(plan, out, show_progress=False)
        assert set(first.variants.values()) == {"written"}
        again = run_plan(plan, out, show_progress=False)
        assert set(again.variants.values()) == {"already complete"}
        open_storage(out).child("alpha_0.5").delete("manifest.json")
        third = run_plan(plan, out, show_progress=False)
        assert third.variants["alpha_0.5"] == "written"
        for alpha in (0.0, 0.5):
            variant = open_storage(out).child(f"alpha_{alpha!r}")
            assert verify_variant(variant).ok, verify_variant(variant).problems
            manifest = read_manifest(variant)
            assert manifest["sources"]["aligned"] == source and manifest["form"] == ("merged" if merge else "adapter")
    result = CliRunner().invoke(main, ["verify", "s3://lora-out/adapters"])
    assert result.exit_code == 0 and result.output.count("ok ") == 2, result.output


def test_lineage_of_an_adapter(models, ray_local):
    """||s * B @ A|| / ||theta_sft|| per group: only layer 1 is changed (layers_to_transform=[1])."""
    sft, adapter = models["patterns"]
    result = CliRunner().invoke(main, ["lineage", str(sft), str(adapter), "--json"])
    assert result.exit_code == 0, result.output
    groups = {g["group"]: g["relative_change"] for g in json.loads(result.stdout)["groups"]}
    assert groups["layer 0"] == 0 and groups["layer 1"] > 0 and groups["embeddings"] == 0
    # the adapter's delta, built whole here, gives the same number
    layers = _lora_layers(_peft(sft, adapter))
    base = load_tensors(sft)
    d2 = sum(float((_delta64(m, False) ** 2).sum()) for m in layers.values())
    b2 = sum(float((t.double() ** 2).sum()) for n, t in base.items() if ".layers.1." in n)
    assert groups["layer 1"] == pytest.approx((d2 / b2) ** 0.5, rel=1e-9)


def test_sweep_specs_choose_the_form_per_pair():
    from expo_ray.sweep.spec import parse_spec

    text = ("destination: /tmp/out\nalphas: [0.1]\npairs:\n  - sft: /m/sft\n    aligned: /m/lora-dpo\n    merge: true\n"
            "  - name: adapters\n    sft: /m/sft\n    aligned: /m/lora-dpo\n")
    merged, adapters = parse_spec(text, "s.yaml").pairs
    assert merged.plan.merge is True and adapters.plan.merge is None
    assert merged.pair_id != adapters.pair_id  # the two forms get their own folders
    with pytest.raises(Exception, match="merge"):
        parse_spec(text.replace("merge: true", "merge: sometimes"), "s.yaml")


def test_an_adapter_from_the_hub(models, tmp_path, ray_local, monkeypatch):
    """hf://org/adapter read through the Hub's protocol (a local server): the variants equal those
    of the same adapter in a local folder, and the manifest names the hf:// source."""
    from hub_server import HubServer
    from huggingface_hub import constants

    sft, adapter = models["embed"]
    server = HubServer()
    try:
        server.add("org/dpo-lora", adapter)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        hub = _write(make_plan(str(sft), "hf://org/dpo-lora", (0.5,)), tmp_path / "hub")
    finally:
        server.close()
    local = _write(make_plan(str(sft), str(adapter), (0.5,)), tmp_path / "local")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (hub / "alpha_0.5" / name).read_bytes() == (local / "alpha_0.5" / name).read_bytes(), name
    assert read_manifest(open_storage(str(hub / "alpha_0.5")))["sources"]["aligned"].startswith("hf://org/dpo-lora")
