"""Inputs are read at the versions the plan read: a shard, config or tokenizer replaced or edited
after the plan (locally, in S3, while tasks read it) fails the run with one line naming the file,
and nothing is committed; a re-run plans again and completes."""
import hashlib
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    build_adapter,
    error_lines,
    finish,
    hf_cache_entry,
    make_bucket,
    reorder_tensors,
    start_cli,
    upload_folder,
    wait_for_stderr,
    wait_until,
)

from expo_ray.api import make_plan
from expo_ray.errors import SourceChanged, StorageError
from expo_ray.extrapolation import theta
from expo_ray.publish.run import run_plan
from expo_ray.storage import Source, open_storage
from expo_ray.storage.s3 import S3Storage

CHANGED = "changed since the plan: re-run to plan again"


def digest_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def copies(bf16_pair, tmp_path):
    sft, aligned = tmp_path / "sft", tmp_path / "aligned"
    shutil.copytree(bf16_pair[0], sft)
    shutil.copytree(bf16_pair[1], aligned)
    return sft, aligned


def reorderable_shard(folder: Path) -> Path:
    """A shard of `folder` holding two tensors of one shape (so that their order can change)."""
    for shard in sorted(folder.glob("*.safetensors")):
        header = json.loads(shard.read_bytes()[8:8 + int.from_bytes(shard.read_bytes()[:8], "little")])
        shapes = [(e["dtype"], tuple(e["shape"])) for k, e in header.items() if k != "__metadata__"]
        if len(shapes) != len(set(shapes)):
            return shard
    raise AssertionError(f"{folder}: no shard with two tensors of one shape")


def nothing_committed(out: Path) -> bool:
    return not list(out.rglob("manifest.json"))


@pytest.mark.slow
@pytest.mark.parametrize("change", ["shard", "config"])
def test_an_input_changed_after_the_plan_is_one_line_and_a_rerun_plans_again(copies, tmp_path, change):
    """The hostile case through the command line: the aligned model changes between the plan and
    the tasks (a shard re-uploaded with its tensors in another order, same size; config.json edited
    to another architecture)."""
    sft, aligned = copies
    out = tmp_path / "out"
    args = ("extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.5", "--out", out, "--no-progress")
    proc = start_cli(*args, EXPO_RAY_CHUNK_DELAY_S="0.05")
    lines = wait_for_stderr(proc, "plan:")
    if change == "shard":
        target = reorderable_shard(aligned)
        reorder_tensors(target)
    else:
        target = aligned / "config.json"
        config = json.loads(target.read_text())
        target.write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    edited = digest_tree(aligned)
    code, stdout, stderr = finish(proc, lines)
    assert code == 1 and stdout == ""
    assert error_lines(stderr) == [f"error: {target}: {CHANGED}"], stderr
    assert nothing_committed(out) and digest_tree(aligned) == edited
    rerun = start_cli(*args)
    code, stdout, stderr = finish(rerun)
    if change == "shard":  # planned again from the file as it is now: a consistent variant
        assert code == 0 and stdout == f"{out}/alpha_0.5: written\n", stderr
    else:  # the plan of the edited inputs refuses them, as it would have at the start
        assert code == 1 and "config.json architectures" in stderr and nothing_committed(out), stderr


def _edit_in_place(path: Path) -> None:
    """Change one byte of the last tensor's data, keeping the file (same inode, same size)."""
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0x01]))


@pytest.mark.parametrize("change", ["shard replaced", "shard edited in place", "shard removed", "config.json",
                                    "tokenizer.json", "README.md"])
def test_local_input_changed_after_the_plan(ray_local, copies, tmp_path, change):
    sft, aligned = copies
    (aligned / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    plan = make_plan(str(sft), str(aligned), (0.5,))
    shard = reorderable_shard(aligned)
    if change == "shard replaced":
        target = shard
        reorder_tensors(shard)
    elif change == "shard edited in place":
        target = shard
        _edit_in_place(shard)
    elif change == "shard removed":
        target = shard
        shard.unlink()
    else:  # a side file the commit copies (README.md: its licence goes into the model card)
        target = aligned / change
        target.write_bytes(target.read_bytes() + b"\n")
    out = tmp_path / "out"
    with pytest.raises(SourceChanged) as caught:
        run_plan(plan, str(out), show_progress=False)
    assert str(caught.value) == f"{target}: {CHANGED}"
    assert nothing_committed(out)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["shard replaced", "shard removed", "config.json", "tokenizer.json"])
def test_s3_input_changed_after_the_plan(ray_local, s3_client, copies, tmp_path, change):
    sft, aligned = copies
    prefix = f"pinned-{change.replace(' ', '-').replace('.', '-')}"
    s3_sft = upload_folder(s3_client, sft, "pinned", f"{prefix}/sft")
    s3_aligned = upload_folder(s3_client, aligned, "pinned", f"{prefix}/aligned")
    make_bucket(s3_client, "pinned-out")
    plan = make_plan(s3_sft, s3_aligned, (0.5,))
    shard = reorderable_shard(aligned)
    key = f"{prefix}/aligned/{shard.name if change.startswith('shard') else change}"
    if change == "shard replaced":
        reorder_tensors(shard)
        s3_client.upload_file(str(shard), "pinned", key)
    elif change == "shard removed":
        s3_client.delete_object(Bucket="pinned", Key=key)
    else:
        s3_client.put_object(Bucket="pinned", Key=key, Body=(aligned / change).read_bytes() + b"\n")
    with pytest.raises(SourceChanged) as caught:
        run_plan(plan, f"s3://pinned-out/{prefix}", show_progress=False)
    assert str(caught.value) == f"s3://pinned/{key}: {CHANGED}"
    manifest = f"{prefix}/alpha_0.5/manifest.json"
    assert not s3_client.list_objects_v2(Bucket="pinned-out", Prefix=manifest).get("Contents")


def test_input_edited_while_the_tasks_read_it(ray_local, copies, tmp_path, monkeypatch):
    """Edited in place (same inode) while tasks read: whether a task opens it after the edit or was
    already reading it, the check before the commit finds it; nothing is committed."""
    sft, aligned = copies
    monkeypatch.setenv("EXPO_RAY_CHUNK_DELAY_S", "0.2")
    plan = make_plan(str(sft), str(aligned), (0.5,))
    out = tmp_path / "out"
    outcome = {}

    def run():
        try:
            run_plan(plan, str(out), show_progress=False)
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: (out / ".expo-ray" / "leases").exists(), "the run to start writing")
    time.sleep(1.0)
    shards = sorted(aligned.glob("*.safetensors"))
    for shard in shards:
        _edit_in_place(shard)
    thread.join(300)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, SourceChanged), error
    assert str(error) in {f"{shard}: {CHANGED}" for shard in shards}
    assert nothing_committed(out)


def test_s3_reader_refuses_an_object_replaced_mid_read(s3_server, s3_client):
    """Every ranged GET asks for the pinned ETag (If-Match): a replacement found mid-read is refused."""
    make_bucket(s3_client, "pinned-reads")
    data = bytes(range(256)) * (80 * 1024)  # 20 MiB: reads beyond the first window are new requests
    s3_client.put_object(Bucket="pinned-reads", Key="m/blob.bin", Body=data)
    source = Source.open("s3://pinned-reads/m")
    plain = S3Storage("pinned-reads", "m").open_reader("blob.bin")
    with source.open_reader("blob.bin") as reader:
        assert reader.read(0, 1000) == data[:1000]
        s3_client.put_object(Bucket="pinned-reads", Key="m/blob.bin", Body=data[::-1])
        with pytest.raises(SourceChanged, match=f"^s3://pinned-reads/m/blob.bin: {CHANGED}$"):
            reader.read(17 * 1024 * 1024, 5000)
    with pytest.raises(SourceChanged, match="^s3://pinned-reads/m/blob.bin: replaced while being read$"):
        plain.read(17 * 1024 * 1024, 5000)
    with pytest.raises(SourceChanged, match=CHANGED):
        source.open_reader("blob.bin")  # opened again: another ETag than the pinned one


def test_a_source_travels_with_its_pins(copies):
    """Pickled (to a Ray task) a Source keeps its pins and reopens its storage; there a file the
    plan did not pin is refused instead of being read at whatever version it has."""
    _, aligned = copies
    plan = make_plan(str(copies[0]), str(aligned), (0.5,))
    source = pickle.loads(pickle.dumps(plan.sources["aligned"]))
    assert source.pins == plan.sources["aligned"].pins and source.location == plan.sources["aligned"].location
    assert source.read_bytes("config.json") == (aligned / "config.json").read_bytes()
    assert "tokenizer.json" in source.pins and "model.safetensors.index.json" in source.pins
    (aligned / "extra.json").write_text("{}")
    with pytest.raises(StorageError, match="extra.json: not read when planning"):
        source.read_bytes("extra.json")
    size, mtime = (aligned / "config.json").stat().st_size, (aligned / "config.json").stat().st_mtime_ns
    assert source.pins["config.json"].startswith(f"size={size},mtime_ns={mtime},ino=")


def test_an_engine_swap_reads_the_planned_versions(copies):
    """The alpha search's in-engine swaps compute theta from the inputs directly: pinned as well."""
    sft, aligned = copies
    plan = make_plan(str(sft), str(aligned), (0.5,))
    stats = theta.Stats()
    assert len(list(theta.iter_theta(plan, 0.5, lambda name: None, stats))) == sum(len(s.tensors) for s in plan.shards)
    shard = reorderable_shard(aligned)
    reorder_tensors(shard)
    with pytest.raises(SourceChanged, match=f"^{shard}: {CHANGED}$"):
        list(theta.iter_theta(plan, 0.5, lambda name: None, theta.Stats()))


def test_a_hub_source_is_pinned_to_its_commit(bf16_pair, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = hf_cache_entry(cache, "tiny-org/pinned", bf16_pair[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = make_plan(str(bf16_pair[0]), "hf://tiny-org/pinned", (0.5,))
    source = plan.sources["aligned"]
    assert source.uri == f"hf://tiny-org/pinned@{commit}"
    assert set(source.pins.values()) == {f"commit={commit}"}
    assert open_storage(source.uri).pin("config.json") == f"commit={commit}"


@pytest.mark.parametrize("form", ["adapter", "merged"])
@pytest.mark.parametrize("change", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_lora_adapter_changed_after_the_plan(ray_local, copies, tmp_path, form, change):
    """An adapter as the aligned model is pinned the same way: its weights (copied, extrapolated or
    merged from) and its config (the variants' scale)."""
    from expo_ray.lora.plan import make_plan as lora_make_plan
    from expo_ray.options import PlanOptions

    sft, _ = copies
    adapter = build_adapter(sft, tmp_path / "adapter", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            modules_to_save=["lm_head"])
    plan = lora_make_plan(str(sft), str(adapter), (0.5,), PlanOptions(merge=form == "merged"))
    assert plan.sources["adapter"].uri == str(adapter) and "adapter_config.json" in plan.sources["adapter"].pins
    if change == "adapter_model.safetensors":
        _edit_in_place(adapter / change)
    else:
        config = json.loads((adapter / change).read_text())
        (adapter / change).write_text(json.dumps({**config, "lora_alpha": 64}))
    out = tmp_path / "out"
    with pytest.raises(SourceChanged) as caught:
        run_plan(plan, str(out), show_progress=False)
    assert str(caught.value) == f"{adapter / change}: {CHANGED}"
    assert nothing_committed(out)
