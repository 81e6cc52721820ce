"""Wrong results are never accepted silently, and every failure is one `error:` line naming the file
and the problem (exit 1, no traceback, nothing committed): non-finite weights, overflowing alphas,
empty or unloadable inputs, hangs (a FIFO in a model folder), a full disk, deep or mistyped files,
misleading messages; and what is not a difference is not refused (-0, config defaults)."""
import json
import math
import os
import pwd
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_env, error_lines, write_checkpoint

from expo_ray.cli import main
from expo_ray.publish.manifest import find_variants, verify_variant
from expo_ray.storage import LocalStorage

EXPO = str(Path(sys.executable).with_name("expo-ray"))
CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "vocab_size": 8}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error(result, *needles) -> str:
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output
    return errors[0]


def nothing_committed(out: Path) -> bool:
    if not out.exists():
        return True
    root = LocalStorage(out)
    return not any(verify_variant(root.child(v) if v else root).ok for v in find_variants(root))


def tiny_pair(root: Path, dtype=torch.bfloat16, edit=None, config=CFG):
    g = torch.Generator().manual_seed(0)
    sft = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(dtype) for i in range(2)}
    sft["model.embed_tokens.weight"] = torch.randn(8, 8, generator=g).to(dtype)
    aligned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in sft.items()}
    if edit:
        edit(sft, aligned)
    write_checkpoint(root / "sft", sft, config, 400)
    write_checkpoint(root / "aligned", aligned, config, 300)
    return root / "sft", root / "aligned"


def extrapolate_args(sft, aligned, out, *more):
    return ("extrapolate", "--sft", sft, "--aligned", aligned, "--out", out, "--no-progress", *more)


# --- wrong results accepted silently ------------------------------------------------------------

@pytest.mark.parametrize("where", ["aligned", "sft"])
def test_nonfinite_inputs_are_refused_unless_allowed(ray_local, tmp_path, where):
    def poison(sft, aligned):
        (aligned if where == "aligned" else sft)["model.layers.1.mlp.up_proj.weight"][3, 2] = math.nan
    sft, aligned = tiny_pair(tmp_path, edit=poison)
    out = tmp_path / "out"
    one_error(run_cli(*extrapolate_args(sft, aligned, out, "--alpha", "0.5")),
              "model.layers.1.mlp.up_proj.weight", f"of the {where} model holds NaN or Inf", "--allow-nonfinite")
    assert nothing_committed(out)
    allowed = run_cli(*extrapolate_args(sft, aligned, out, "--alpha", "0.5", "--allow-nonfinite"))
    assert allowed.exit_code == 0, allowed.output
    from safetensors.torch import load_file

    shard = json.loads((out / "alpha_0.5" / "model.safetensors.index.json").read_text())["weight_map"]
    w = load_file(out / "alpha_0.5" / shard["model.layers.1.mlp.up_proj.weight"])["model.layers.1.mlp.up_proj.weight"]
    assert torch.isnan(w[3, 2]) and torch.isfinite(w).sum() == w.numel() - 1
    lineage = run_cli("lineage", sft, aligned)
    assert lineage.exit_code == 0 and "warning: " in lineage.output and "NaN or Inf" in lineage.output, lineage.output


def test_alpha_that_overflows_is_refused(ray_local, tmp_path):
    sft, aligned = tiny_pair(tmp_path)
    out = tmp_path / "out"
    one_error(run_cli(*extrapolate_args(sft, aligned, out, "--alpha", "1e300")), "alpha 1e+300", "overflows", "BF16")
    assert nothing_committed(out)
    # alpha x scale beyond float64: refused by the plan (so also by --dry-run), before any work
    one_error(run_cli(*extrapolate_args(sft, aligned, out, "--alpha", "10", "--scale", "*=1e308", "--dry-run")),
              "alpha 10.0", "1e+308", "not a finite number")


@pytest.mark.parametrize("alphas,problem", [("-0.5", "negative"), ("1e-400", "rounds to 0"),
                                            ("0.1,inf", "not a finite")])
def test_alpha_lists_follow_one_rule(bf16_pair, tmp_path, alphas, problem):
    one_error(run_cli(*extrapolate_args(*bf16_pair, tmp_path / "o", "--alpha", alphas, "--dry-run")), problem)
    help_text = run_cli("extrapolate", "--help").output
    assert "alpha >= 0" in " ".join(help_text.split())


def test_empty_and_unloadable_inputs_are_refused(tmp_path):
    sft, aligned = tiny_pair(tmp_path)
    one_error(run_cli(*extrapolate_args(aligned, aligned, tmp_path / "o", "--dry-run")), "same model folder")
    for name in ("sft", "aligned"):  # a pair holding no tensors at all
        write_checkpoint(tmp_path / f"empty-{name}", {}, CFG, 100, always_index=False)
    (tmp_path / "empty-sft" / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (tmp_path / "empty-aligned" / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    one_error(run_cli(*extrapolate_args(tmp_path / "empty-sft", tmp_path / "empty-aligned",
                                        tmp_path / "o", "--dry-run")),
              "model.safetensors", "no tensors")
    header = json.dumps({"t": {"dtype": "F32", "shape": [0, 2 ** 62], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "empty-aligned" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    one_error(run_cli("inspect", tmp_path / "empty-aligned"), "model.safetensors", "too large")
    assert not (tmp_path / "o").exists()


def test_verify_needs_a_manifest_that_covers_the_folder(ray_local, bf16_pair, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*extrapolate_args(*bf16_pair, out, "--alpha", "0.5")).exit_code == 0
    variant = out / "alpha_0.5"
    manifest = json.loads((variant / "manifest.json").read_text())
    shard = next(variant.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    for files, problem in (([], "lists no files"), ([1], "not a file record"),
                           ([{"path": "x.safetensors", "size": "big", "sha256": 3}], "not a file record")):
        (variant / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        check = run_cli("verify", variant)
        assert check.exit_code == 1 and problem in check.output and "Traceback" not in check.output, check.output
    (variant / "manifest.json").write_text(json.dumps(manifest))
    index = json.loads((variant / "model.safetensors.index.json").read_text())
    (variant / "model.safetensors.index.json").write_text(json.dumps({**index,
                                                                      "weight_map": list(index["weight_map"])}))
    check = run_cli("verify", variant)
    assert check.exit_code == 1 and "Traceback" not in check.output and "index.json" in check.output, check.output
    (variant / "manifest.json").write_text(json.dumps({**manifest, "files": []}))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    evaluate = run_cli("evaluate", "--variants", out, "--prompts", tmp_path / "prompts.jsonl", "--reward-model",
                       bf16_pair[1])
    one_error(evaluate, "alpha_0.5", "lists no files")


# --- hangs and tracebacks -----------------------------------------------------------------------

def test_unreachable_address_fails_within_seconds(bf16_pair, tmp_path):
    from expo_ray.storage.embedded_s3 import free_port

    began = time.monotonic()
    run = subprocess.run([EXPO, *map(str, extrapolate_args(*bf16_pair, tmp_path / "o", "--alpha", "0.5",
                                                          "--address", f"127.0.0.1:{free_port()}"))],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=""))
    one_error(run, "cannot connect to the Ray cluster at 127.0.0.1:")
    assert time.monotonic() - began < 60
    assert nothing_committed(tmp_path / "o")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("hashes", ["blake3", "sha256"])
def test_disk_full_is_one_line_and_nothing_is_committed(pair_factory, small_disk, hashes):
    """Inside a Ray task (byte ranges, or a whole shard with --sha256): the one line names the file
    and the cause, exactly; no remote traceback, no task name."""
    sft, aligned = pair_factory(dtype="bfloat16", aligned_shard_size=10 ** 9, seed=1)  # one model.safetensors
    out = small_disk / "out"
    run = subprocess.run([EXPO, *map(str, extrapolate_args(sft, aligned, out, "--alpha", "0.5")),
                          *(["--sha256"] if hashes == "sha256" else [])],
                         capture_output=True, text=True, timeout=300, env=cli_env())
    assert run.returncode == 1 and run.stdout == ""
    assert error_lines(run.stderr) == [
        f"error: {out}/alpha_0.5/model.safetensors: cannot write (No space left on device)"], run.stderr
    assert nothing_committed(out)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("target", ["header", "index", "config", "manifest"])
def test_deeply_nested_json_is_one_line(bf16_pair, tmp_path, target):
    import shutil

    aligned = tmp_path / "aligned"
    shutil.copytree(bf16_pair[1], aligned)
    deep = ('{"a": ' + nested(100_000) + "}").encode()
    if target == "header":
        shard = next(aligned.glob("*.safetensors"))
        raw = shard.read_bytes()
        shard.write_bytes(struct.pack("<Q", len(deep)) + deep + raw[8 + int.from_bytes(raw[:8], "little"):])
        named, command = shard.name, ("inspect", aligned)
    elif target in ("index", "config"):
        named = "model.safetensors.index.json" if target == "index" else "config.json"
        (aligned / named).write_bytes(deep)
        command = ("inspect", aligned)
    else:
        named = "manifest.json"
        (aligned / named).write_bytes(deep)
        command = ("verify", aligned)
    result = run_cli(*command)
    if target == "manifest":
        assert result.exit_code == 1 and "nested too deeply" in result.output and "Traceback" not in result.output
    else:
        one_error(result, named, "nested too deeply")


def test_deep_or_wrong_sweep_specs_are_one_line(bf16_pair, tmp_path):
    base = f"destination: {tmp_path / 'dest'}\npairs:\n  - sft: {bf16_pair[0]}\n    aligned: {bf16_pair[1]}\n"
    cases = [
        ("alphas: " + nested(100_000) + "\n" + base, "nested too deeply"),
        (base + "chunk_mib: .inf\n", "chunk_mib"),
        ("alphas: [0.1]\nalphas: [0.2]\n" + base, "duplicate key 'alphas'"),
        ("alphas: [1.0e-400]\n" + base, "rounds to 0"),
    ]
    for i, (text, problem) in enumerate(cases):
        spec = tmp_path / f"s{i}.yaml"
        spec.write_text(text)
        one_error(run_cli("sweep", "--check", spec), problem)
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes(base.encode() + b"# caf\xe9\n")
    one_error(run_cli("sweep", "--check", spec), "latin1.yaml", "UTF-8")


@pytest.mark.parametrize("config,problem", [
    ({**CFG, "num_hidden_layers": "two"}, "num_hidden_layers"),
    ({**CFG, "vocab_size": None}, "vocab_size"),
])
def test_config_values_of_the_wrong_type(tmp_path, config, problem):
    sft, aligned = tiny_pair(tmp_path, config=config)
    one_error(run_cli(*extrapolate_args(sft, aligned, tmp_path / "o", "--allow-added-rows", "--dry-run")),
              "config.json", problem)


def test_odd_paths_are_one_line(bf16_pair, tmp_path):
    long_name = tmp_path / ("x" * 300)
    one_error(run_cli("inspect", long_name), "x" * 50)
    one_error(run_cli(*extrapolate_args(*bf16_pair, long_name / "out", "--alpha", "0.5")), "x" * 50)
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    run = subprocess.run([EXPO, "inspect", os.fsencode(odd)], capture_output=True, timeout=120)
    run.stdout, run.stderr = run.stdout.decode(errors="replace"), run.stderr.decode(errors="replace")
    one_error(run, "no such model folder")


# --- misleading messages ------------------------------------------------------------------------

def test_destination_problems_are_named_before_ray_starts(bf16_pair, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, problem in ((tmp_path / "file" / "out", "not writable"),
                         ("hf://org/name", "hf:// locations are read-only")):
        run = subprocess.run([EXPO, *map(str, extrapolate_args(*bf16_pair, out, "--alpha", "0.5"))],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=""))
        one_error(run, problem)
        assert "Ray" not in run.stderr.replace("error:", ""), run.stderr


def test_unreadable_folder_is_not_called_missing(bf16_pair, tmp_path):
    import shutil
    from contextlib import contextmanager

    folder = tmp_path / "private"
    shutil.copytree(bf16_pair[1], folder)
    folder.chmod(0o000)

    @contextmanager
    def unprivileged():  # root reads anything: act as another user for the duration
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(pwd.getpwnam("nobody").pw_uid)
        try:
            yield
        finally:
            os.seteuid(0)
    try:
        with unprivileged():
            inspect = run_cli("inspect", folder)
            verify = run_cli("verify", folder)
    finally:
        folder.chmod(0o755)
    one_error(inspect, "private", "Permission denied")
    one_error(verify, "private", "Permission denied")


def test_fp8_tensors_are_named_as_fp8(ray_local, tmp_path):
    def fp8(sft, aligned):
        sft["model.norm.scale"] = torch.zeros(4).to(torch.float8_e4m3fn)
        aligned["model.norm.scale"] = torch.ones(4).to(torch.float8_e4m3fn)
    sft, aligned = tiny_pair(tmp_path, edit=fp8)
    one_error(run_cli(*extrapolate_args(sft, aligned, tmp_path / "o", "--alpha", "0.5")), "model.norm.scale",
              "FP8 (F8_E4M3)", "differs")


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "LICENSE"])
def test_a_fifo_or_device_in_a_model_folder_is_refused_by_name(bf16_pair, tmp_path, kind, name):
    """Listing a folder refuses what is not a regular file (opening a FIFO would wait forever)."""
    import shutil
    import stat

    aligned = tmp_path / "aligned"
    shutil.copytree(bf16_pair[1], aligned)
    (aligned / name).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(aligned / name)
    else:
        try:
            os.mknod(aligned / name, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is
        except PermissionError:
            pytest.skip("needs permission to create a device node")
    what = "a FIFO" if kind == "fifo" else "a character device"
    for command in (("inspect", aligned), extrapolate_args(bf16_pair[0], aligned, tmp_path / "o", "--dry-run")):
        run = subprocess.run([EXPO, *map(str, command)], capture_output=True, text=True, timeout=60, env=cli_env())
        assert run.returncode == 1
        assert error_lines(run.stdout + run.stderr) == [f"error: {aligned / name}: {what}, not a regular file; refused"]


def test_minus_zero_is_alpha_zero(ray_local, bf16_pair, tmp_path):
    out = tmp_path / "out"
    first = run_cli(*extrapolate_args(*bf16_pair, out, "--alpha", "0"))
    again = run_cli(*extrapolate_args(*bf16_pair, out, "--alpha", "-0"))
    assert first.exit_code == 0 and f"{out}/alpha_0.0: written" in first.output.splitlines(), first.output
    assert again.exit_code == 0 and f"{out}/alpha_0.0: already complete" in again.output.splitlines(), again.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("alpha")) == ["alpha_0.0"]
    assert json.loads((out / "alpha_0.0" / "manifest.json").read_text())["alpha"] == 0.0
    one_error(run_cli(*extrapolate_args(*bf16_pair, out, "--alpha", "0,-0.0", "--dry-run")), "repeats a value")


@pytest.mark.parametrize("key,default", [("head_dim", 32), ("tie_word_embeddings", False),
                                         ("num_key_value_heads", 2)])
def test_a_config_that_leaves_out_a_default_matches_one_that_writes_it(bf16_pair, tmp_path, key, default):
    """Pairs saved by different transformers versions: one writes the default (here: llama's, with
    hidden_size 64 and 2 attention heads), the other leaves the key out."""
    import shutil

    sft, aligned = tmp_path / "sft", tmp_path / "aligned"
    shutil.copytree(bf16_pair[0], sft)
    shutil.copytree(bf16_pair[1], aligned)
    config = json.loads((sft / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_attention_heads"]) == ("llama", 64, 2)
    config.pop(key)
    (sft / "config.json").write_text(json.dumps(config))
    (aligned / "config.json").write_text(json.dumps({**config, key: default}))
    assert run_cli(*extrapolate_args(sft, aligned, tmp_path / "o", "--alpha", "0.5", "--dry-run")).exit_code == 0
    other = (not default) if isinstance(default, bool) else default * 2  # not the default: a real difference
    (aligned / "config.json").write_text(json.dumps({**config, key: other}))
    one_error(run_cli(*extrapolate_args(sft, aligned, tmp_path / "o", "--dry-run")),
              f"config.json {key}: sft={default!r} aligned={other!r}")
    for folder in (sft, aligned):  # a model type whose defaults expo-ray does not know: compared as written
        written = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**written, "model_type": "unknown-arch"}))
    (aligned / "config.json").write_text(json.dumps({**config, "model_type": "unknown-arch", key: default}))
    one_error(run_cli(*extrapolate_args(sft, aligned, tmp_path / "o", "--dry-run")),
              f"config.json {key}: sft=None aligned={default!r}")
