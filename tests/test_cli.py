"""The `expo-ray` command: bad input gets one clear message and no variant; real runs verify."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from blake3 import blake3
from click.testing import CliRunner

from expo_ray.cli import main
from expo_ray.publish.manifest import find_variants, verify_variant
from expo_ray.storage import LocalStorage

EXPO = str(Path(sys.executable).with_name("expo-ray"))


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def no_committed_variant(out: Path) -> bool:
    if not out.exists():
        return True
    root = LocalStorage(out)
    return not any(verify_variant(root.child(v) if v else root).ok for v in find_variants(root))


def corrupt(kind: str, sft: Path, aligned: Path) -> Path:
    """Damage a copy of the pair in one way; returns the file the message must name."""
    index = json.loads((aligned / "model.safetensors.index.json").read_text())
    from collections import Counter

    shard = aligned / Counter(index["weight_map"].values()).most_common(1)[0][0]  # a shard with several tensors
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]

    def rewrite_header(h):
        body = json.dumps(h).encode()
        shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])

    if kind == "truncated":
        shard.write_bytes(raw[: len(raw) - 100])
    elif kind == "header_too_long":
        shard.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    elif kind == "overlap":
        first = min(names, key=lambda k: header[k]["data_offsets"][0])
        second = min((k for k in names if k != first), key=lambda k: header[k]["data_offsets"][0])
        header[second]["data_offsets"] = [x - 2 for x in header[second]["data_offsets"]]
        rewrite_header(header)
    elif kind == "unknown_dtype":
        header[names[0]]["dtype"] = "F13"
        rewrite_header(header)
    elif kind == "missing_shard":
        index["weight_map"][names[0]] = "model-00042-of-00099.safetensors"
        (aligned / "model.safetensors.index.json").write_text(json.dumps(index))
        return aligned / "model.safetensors.index.json"
    elif kind == "outside_path":
        index["weight_map"][names[0]] = "../sft/" + index["weight_map"][names[0]]
        (aligned / "model.safetensors.index.json").write_text(json.dumps(index))
        return aligned / "model.safetensors.index.json"
    elif kind == "architecture":
        cfg = json.loads((aligned / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
        (aligned / "config.json").write_text(json.dumps(cfg))
        return aligned / "config.json"
    elif kind in ("shape", "missing_tensor"):
        from safetensors.torch import load_file, save_file

        s_index = json.loads((sft / "model.safetensors.index.json").read_text())
        target = "model.layers.1.mlp.down_proj.weight"
        s_shard = sft / s_index["weight_map"][target]
        tensors = load_file(s_shard)
        if kind == "shape":
            tensors[target] = tensors[target][:-1].contiguous()
        else:
            del tensors[target]
            del s_index["weight_map"][target]
            (sft / "model.safetensors.index.json").write_text(json.dumps(s_index))
        save_file(tensors, s_shard, metadata={"format": "pt"})
        return Path(target)
    elif kind == "pickle":
        for f in aligned.glob("*.safetensors*"):
            f.unlink()
        (aligned / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
        return aligned / "pytorch_model.bin"
    return shard


@pytest.mark.parametrize("kind,problem", [
    ("truncated", "truncated"),
    ("header_too_long", "larger than the file"),
    ("overlap", "overlaps"),
    ("unknown_dtype", "unknown or unsupported dtype 'F13'"),
    ("missing_shard", "does not exist"),
    ("outside_path", "outside the model folder"),
    ("shape", "shape sft="),
    ("missing_tensor", "only in the aligned model"),
    ("architecture", "architectures"),
    ("pickle", "pickle checkpoints"),
])
def test_bad_input_is_refused_clearly(bf16_pair, tmp_path, kind, problem):
    sft, aligned = tmp_path / "sft", tmp_path / "aligned"
    shutil.copytree(bf16_pair[0], sft)
    shutil.copytree(bf16_pair[1], aligned)
    named = corrupt(kind, sft, aligned)
    out = tmp_path / "out"
    result = run_cli("extrapolate", "--sft", str(sft), "--aligned", str(aligned), "--alpha", "0.3", "--out", str(out),
                     "--no-progress")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and problem in result.output, result.output
    assert named.name in result.output, result.output
    assert "Traceback" not in result.output
    assert no_committed_variant(out)


def test_inspect_and_dry_run(bf16_pair):
    result = run_cli("inspect", "--json", str(bf16_pair[1]))
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert (info["architectures"] == ["LlamaForCausalLM"] and len(info["shards"]) > 1
            and info["dtypes"].keys() == {"BF16"})
    text = run_cli("inspect", "--tensors", str(bf16_pair[1])).output
    assert "model.embed_tokens.weight  BF16" in text
    dry = run_cli("extrapolate", "--sft", str(bf16_pair[0]), "--aligned", str(bf16_pair[1]), "--out", "/nonexistent/x",
                  "--dry-run")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["alphas"] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_lineage_flags_unrelated_models(ray_local, bf16_pair, tmp_path):
    from helpers import build_unrelated

    related = run_cli("lineage", "--json", str(bf16_pair[0]), str(bf16_pair[1]))
    report = json.loads(related.stdout)
    assert report["warnings"] == [] and 0 < report["overall"] < 0.05
    assert [g["group"] for g in report["groups"]][:3] == ["embeddings", "layer 0", "layer 1"]
    other = build_unrelated(tmp_path / "other")
    unrelated = run_cli("lineage", str(bf16_pair[0]), str(other))
    assert unrelated.exit_code == 0 and "do not look like an aligned model and its own SFT parent" in unrelated.output


def test_command_line_end_to_end(bf16_pair, tmp_path):
    """The real console script, in its own process, starting its own local Ray."""
    env = dict(os.environ, RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0")
    out = tmp_path / "variants"
    run = subprocess.run([EXPO, "extrapolate", "--sft", str(bf16_pair[0]), "--aligned", str(bf16_pair[1]),
                          "--alpha", "0.25,0.5", "--out", str(out), "--sha256"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    # no progress bar: stderr is no terminal
    assert f"{out}/alpha_0.25: written" in run.stdout and "\r" not in run.stderr
    check = subprocess.run([EXPO, "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("ok ") == 2, check.stdout
    # --sha256: every file carries the whole-file sha256 (as Hub LFS pointers) besides BLAKE3
    shard = next((out / "alpha_0.5").glob("*.safetensors"))
    record = _manifest_record(out / "alpha_0.5", shard.name)
    assert record["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    # one 16 MiB block: BLAKE3 of the block's BLAKE3 digest
    assert record["blake3_16mib_tree"] == blake3(blake3(shard.read_bytes()).digest()).hexdigest()
    # Damage one output byte: verify names the file and fails.
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    check = subprocess.run([EXPO, "verify", str(out / "alpha_0.5")], capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and shard.name in check.stdout and "blake3" in check.stdout


def _manifest_record(variant, path):
    manifest = json.loads((variant / "manifest.json").read_text())
    return next(r for r in manifest["files"] if r["path"] == path)


def test_manifests_written_before_blake3_still_verify(ray_local, bf16_pair, tmp_path):
    """Manifests that record sha256 alone (as expo-ray wrote them before BLAKE3) verify, and a
    damaged file is caught by its sha256."""
    out = tmp_path / "variants"
    run = run_cli("extrapolate", "--sft", str(bf16_pair[0]), "--aligned", str(bf16_pair[1]), "--alpha", "0.5",
                  "--out", str(out), "--no-progress")
    assert run.exit_code == 0, run.output
    variant = out / "alpha_0.5"
    manifest = json.loads((variant / "manifest.json").read_text())
    assert all("blake3_16mib_tree" in r and "sha256" not in r for r in manifest["files"])  # the default
    for r in manifest["files"]:
        r["sha256"] = hashlib.sha256((variant / r["path"]).read_bytes()).hexdigest()
        del r["blake3_16mib_tree"]
    (variant / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert verify_variant(LocalStorage(variant)).ok
    shard = next(variant.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    result = verify_variant(LocalStorage(variant))
    assert not result.ok and any(shard.name in p and "sha256" in p for p in result.problems), result.problems
    # a record without any content hash is a problem too, not a silent pass
    manifest["files"][0].pop("sha256")
    (variant / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    problems = verify_variant(LocalStorage(variant)).problems
    assert any("files[0] is not a file record" in p and "digest" in p for p in problems), problems


def test_demo_refuses_a_grid_without_alpha_0(tmp_path):
    """(The demo itself runs end to end in test_demo.py.)"""
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo"), "--alpha", "1,2"])
    assert result.exit_code == 2 and "must include 0" in result.output
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_bad_seed_list(tmp_path):
    for bad in ("0,x", "1,1", ","):
        result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo"), "--seeds", bad])
        assert result.exit_code == 2 and "--seeds" in result.output, result.output
    assert not (tmp_path / "demo").exists()
