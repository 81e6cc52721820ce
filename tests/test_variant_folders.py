"""A variant folder is written only where it should be and committed holding exactly its manifest:
no write through a link (into an input, or out of the destination); after a failed run, or one
killed at any point, a later run of another job leaves a folder whose every *.safetensors is
listed; two runs of different jobs at once never both write one folder; a run that lost its lease
removes only its own files."""
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    assert_holds_exactly_its_manifest,
    error_lines,
    finish,
    kill_group,
    make_bucket,
    s3_files,
    start_cli,
    wait_until,
)

from expo_ray.api import extrapolate
from expo_ray.cli import main
from expo_ray.errors import ExpoError, StorageError
from expo_ray.storage import LocalStorage

ALPHA = "0.5"
LEASE_REFUSED = ("another run with other inputs or settings is writing it; nothing was written; wait for that run to "
                 "finish or choose another --out (the lease of a run that is gone expires 600 s after its last "
                 "renewal)")


def digest_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def two_jobs(pair_factory, tmp_path):
    """Two pairs of different layouts: A's aligned model in several shards, B's in one file (and
    without A's chat template, so that a side file of A's is no name of B's)."""
    a_sft, a_aligned = pair_factory(dtype="bfloat16")
    b_sft, b_aligned = pair_factory(dtype="bfloat16", aligned_shard_size=10 ** 9, seed=1)
    pairs = {}
    for name, (sft, aligned) in {"A": (a_sft, a_aligned), "B": (b_sft, b_aligned)}.items():
        shutil.copytree(sft, tmp_path / name / "sft")
        shutil.copytree(aligned, tmp_path / name / "aligned")
        pairs[name] = (tmp_path / name / "sft", tmp_path / name / "aligned")
    (pairs["B"][1] / "chat_template.jinja").unlink()
    assert len(list(pairs["A"][1].glob("*.safetensors"))) > 2 and (pairs["B"][1] / "model.safetensors").exists()
    return pairs


def args_of(pair, out, *more):
    return ("extrapolate", "--sft", pair[0], "--aligned", pair[1], "--alpha", ALPHA, "--out", out, "--no-progress",
            *more)


# --- links -------------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["variant into aligned", "variant into a folder of sft", "bookkeeping into aligned",
                                  "variant out of the destination"])
def test_a_link_in_the_destination_is_refused_before_anything_is_written(bf16_pair, tmp_path, link):
    sft, aligned = tmp_path / "sft", tmp_path / "aligned"
    shutil.copytree(bf16_pair[0], sft)
    shutil.copytree(bf16_pair[1], aligned)
    (sft / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    folder, target = {
        "variant into aligned": (f"alpha_{ALPHA}", aligned),
        "variant into a folder of sft": (f"alpha_{ALPHA}", sft / "sub"),
        "bookkeeping into aligned": (".expo-ray", aligned),
        "variant out of the destination": (f"alpha_{ALPHA}", elsewhere),
    }[link]
    (out / folder).symlink_to(target)
    before = {p: digest_tree(p) for p in (sft, aligned, elsewhere)}
    result = run_cli(*args_of((sft, aligned), out))
    role, model = ("aligned", aligned) if "aligned" in link else ("sft", sft)
    expected = {
        "variant into aligned": f"error: {out}/{folder}: is a link into the aligned model folder {aligned}; writing "
                                "there would overwrite the input; remove the link or choose another destination",
        "variant into a folder of sft": f"error: {out}/{folder}: is a link into the sft model folder {sft} (it leads "
                                        f"to {sft}/sub); writing there would overwrite the input; remove the link or "
                                        "choose another destination",
        "bookkeeping into aligned": f"error: {out}/{folder}: is a link into the aligned model folder {aligned}; "
                                    "writing there would overwrite the input; remove the link or choose another "
                                    "destination",
        "variant out of the destination": f"error: {out}/{folder}: is a link to {elsewhere}, outside the destination; "
                                          "refused (expo-ray never writes through a link out of the destination)",
    }[link]
    assert result.exit_code == 1 and error_lines(result.output) == [expected], result.output
    assert {p: digest_tree(p) for p in (sft, aligned, elsewhere)} == before, (role, model)


def test_writes_never_follow_a_link_out_of_the_folder(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"input")
    (root / "sub").symlink_to(outside)
    store = LocalStorage(root)
    for write in (lambda: store.write_bytes("sub/x.safetensors", b"out"),
                  lambda: store.begin_ranged("sub/x.safetensors", 10),
                  lambda: store.delete("sub/x.safetensors"),
                  lambda: store.child("sub")):
        with pytest.raises(StorageError, match="outside|link out of"):
            write()
    # A link as the file itself is replaced by the new file, never written through.
    (root / "y.safetensors").symlink_to(outside / "x.safetensors")
    store.write_bytes("y.safetensors", b"out")
    assert (outside / "x.safetensors").read_bytes() == b"input" and not (root / "y.safetensors").is_symlink()
    assert (root / "y.safetensors").read_bytes() == b"out" and os.listdir(outside) == ["x.safetensors"]


# --- leftovers and foreign files ---------------------------------------------------------------

def test_after_a_failed_run_another_layout_commits_exactly_its_manifest(ray_local, two_jobs, tmp_path):
    """A NaN found after some shards landed: the next run, of another layout, removes them."""
    from safetensors.torch import load_file, save_file

    a_aligned = two_jobs["A"][1]
    last = sorted(a_aligned.glob("model-*.safetensors"))[-1]
    tensors = load_file(str(last))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = math.nan
    save_file(tensors, str(last), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ExpoError, match="NaN or Inf"):
        extrapolate(str(two_jobs["A"][0]), str(a_aligned), (0.5,), str(out), sha256=True, show_progress=False)
    assert list((out / f"alpha_{ALPHA}").glob("model-0000*.safetensors")), "no shard landed before the failure"
    result = extrapolate(*map(str, two_jobs["B"]), (0.5,), str(out), show_progress=False)
    assert result.variants == {f"alpha_{ALPHA}": "written"}
    assert_holds_exactly_its_manifest(out / f"alpha_{ALPHA}")
    assert not (out / ".expo-ray" / "receipts" / f"alpha_{ALPHA}").exists() or \
        not list((out / ".expo-ray" / "receipts" / f"alpha_{ALPHA}").iterdir())


@pytest.mark.parametrize("foreign", ["notes.txt", "model-00009-of-00009.safetensors"])
def test_foreign_files_in_a_variant_folder_are_refused_before_any_work(bf16_pair, tmp_path, foreign):
    out = tmp_path / "out"
    (out / f"alpha_{ALPHA}").mkdir(parents=True)
    content = b"mine" if foreign.endswith(".txt") else (8).to_bytes(8, "little") + b'{"a":{} }'
    (out / f"alpha_{ALPHA}" / foreign).write_bytes(content)
    (out / f"alpha_{ALPHA}" / ".hidden").write_bytes(b"loaders skip it")
    result = run_cli(*args_of(bf16_pair, out, "--address", "127.0.0.1:1"))  # no Ray needed to refuse it
    assert result.exit_code == 1 and error_lines(result.output) == [
        f"error: {out}/alpha_{ALPHA}/{foreign}: not written by expo-ray, and not part of this variant; a committed "
        "folder holds exactly its manifest's files (loaders read every *.safetensors and *.json there): move it "
        "away or choose another --out"], result.output
    assert (out / f"alpha_{ALPHA}" / foreign).read_bytes() == content


# --- killed runs -------------------------------------------------------------------------------

def _variant_files(where, out_uri, s3_client) -> set[str]:
    if where == "local":
        folder = Path(out_uri) / f"alpha_{ALPHA}"
        return {p.name for p in folder.iterdir()} if folder.exists() else set()
    bucket, prefix = out_uri[len("s3://"):].split("/", 1)
    return {k for k in s3_files(s3_client, bucket, f"{prefix}/alpha_{ALPHA}")}


def _lease_files(where, out_uri, s3_client) -> set[str]:
    if where == "local":
        return {p.name for p in (Path(out_uri) / ".expo-ray" / "leases" / f"alpha_{ALPHA}").glob("*.json")}
    bucket, prefix = out_uri[len("s3://"):].split("/", 1)
    return set(s3_files(s3_client, bucket, f"{prefix}/.expo-ray/leases/alpha_{ALPHA}"))


def _local_copy(where, out_uri, s3_client, tmp_path) -> Path:
    if where == "local":
        return Path(out_uri) / f"alpha_{ALPHA}"
    bucket, prefix = out_uri[len("s3://"):].split("/", 1)
    copy = tmp_path / "copy"
    copy.mkdir()
    for key, data in s3_files(s3_client, bucket, f"{prefix}/alpha_{ALPHA}").items():
        (copy / key).write_bytes(data)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("point", ["lease taken", "shard landed", "mid-commit"])
def test_killed_at_any_point_then_another_layout_commits_exactly_its_manifest(ray_local, s3_client, two_jobs,
                                                                            tmp_path, where, point):
    if where == "local":
        out = str(tmp_path / "out")
    else:
        make_bucket(s3_client, "killed")
        out = f"s3://killed/{point.replace(' ', '-')}"
    delays = {"lease taken": {"EXPO_RAY_CHUNK_DELAY_S": "1"}, "shard landed": {"EXPO_RAY_CHUNK_DELAY_S": "0.3"},
              "mid-commit": {"EXPO_RAY_COMMIT_DELAY_S": "120"}}[point]
    proc = start_cli(*args_of(two_jobs["A"], out, "--sha256"), **delays)
    try:
        if point == "lease taken":
            wait_until(lambda: _lease_files(where, out, s3_client), "the lease", proc=proc)
        elif point == "shard landed":
            wait_until(lambda: any(f.startswith("model-") for f in _variant_files(where, out, s3_client)),
                       "a shard", proc=proc)
        else:
            wait_until(lambda: "tokenizer.json" in _variant_files(where, out, s3_client), "the side files", proc=proc)
            assert "manifest.json" not in _variant_files(where, out, s3_client)
    finally:
        kill_group(proc)
    left = _variant_files(where, out, s3_client)
    result = extrapolate(*map(str, two_jobs["B"]), (0.5,), out, show_progress=False)
    assert result.variants == {f"alpha_{ALPHA}": "written"}
    if point == "mid-commit":  # A's chat template, which B does not have, was among the leftovers
        assert "chat_template.jinja" in left
    assert_holds_exactly_its_manifest(_local_copy(where, out, s3_client, tmp_path))
    assert not _lease_files(where, out, s3_client)


# --- concurrent runs ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_runs_of_different_layouts_never_share_a_folder(s3_client, two_jobs, tmp_path, where):
    if where == "local":
        out = str(tmp_path / "out")
    else:
        make_bucket(s3_client, "concurrent")
        out = "s3://concurrent/run"
    first = start_cli(*args_of(two_jobs["A"], out, "--sha256"), EXPO_RAY_CHUNK_DELAY_S="0.5")
    wait_until(lambda: _lease_files(where, out, s3_client), "the first run's lease", proc=first)
    second = start_cli(*args_of(two_jobs["B"], out))
    code_b, out_b, err_b = finish(second)
    code_a, out_a, err_a = finish(first)
    assert (code_a, out_a) == (0, f"{out}/alpha_{ALPHA}: written\n"), err_a
    assert code_b == 1 and out_b == "" and error_lines(err_b) == [f"error: {out}/alpha_{ALPHA}: {LEASE_REFUSED}"], err_b
    assert_holds_exactly_its_manifest(_local_copy(where, out, s3_client, tmp_path))


@pytest.mark.slow
def test_a_run_that_lost_its_lease_removes_only_its_own_files(ray_local, two_jobs, tmp_path, monkeypatch):
    """A run stopped for longer than its lease: another job takes the folder over and commits; the
    stopped run, resumed, commits nothing and removes what it wrote, nothing of the other's."""
    out = tmp_path / "out"
    monkeypatch.setenv("EXPO_RAY_LEASE_S", "3")
    stopped = start_cli(*args_of(two_jobs["A"], out, "--sha256"), EXPO_RAY_CHUNK_DELAY_S="0.3")
    try:
        wait_until(lambda: list((out / f"alpha_{ALPHA}").glob("model-*.safetensors")), "a shard", proc=stopped)
        os.killpg(stopped.pid, signal.SIGSTOP)
        time.sleep(4)  # its lease is no longer renewed: stale
        result = extrapolate(*map(str, two_jobs["B"]), (0.5,), str(out), show_progress=False)
        assert result.variants == {f"alpha_{ALPHA}": "written"}
        committed = digest_tree(out / f"alpha_{ALPHA}")
    finally:
        os.killpg(stopped.pid, signal.SIGCONT)
    code, stdout, stderr = finish(stopped)
    assert code == 1 and stdout == ""
    assert error_lines(stderr) in (
        [f"error: {out}/alpha_{ALPHA}: committed meanwhile by another run with other inputs or settings (its manifest "
         "differs); nothing of this run was committed there; choose another --out"],
        [f"error: {out}/alpha_{ALPHA}: taken over by another run with other inputs or settings while this run was "
         "writing it (this run was stopped for longer than the 3-second lease); nothing of this run was committed "
         "there"]), stderr
    assert digest_tree(out / f"alpha_{ALPHA}") == committed
    assert_holds_exactly_its_manifest(out / f"alpha_{ALPHA}")


def test_a_committed_folder_is_what_a_loader_reads(ray_local, bf16_pair, tmp_path):
    """Every *.safetensors of a fresh variant, as vLLM globs them, is exactly the manifest's tensors."""
    out = tmp_path / "out"
    extrapolate(*map(str, bf16_pair), (0.2, 0.5), str(out), show_progress=False)
    for name in ("alpha_0.2", "alpha_0.5"):
        assert_holds_exactly_its_manifest(out / name)
    index = json.loads((out / "alpha_0.5" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (out / "alpha_0.5").glob("*.safetensors")}
