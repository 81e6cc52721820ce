"""hf:// sources read by byte range from a server speaking the Hub's protocol (tests/hub_server.py,
on loopback; huggingface_hub is pointed at it with HF_ENDPOINT): planning reads headers only, a
run reads each input byte once, and the variants equal those of the same run on local folders."""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
from hub_server import HubServer

from expo_ray.api import extrapolate, make_plan
from expo_ray.errors import StorageError
from expo_ray.storage import open_storage

ALPHAS = (0.5, 2.0)


@pytest.fixture(scope="module")
def many_shard_pair(tmp_path_factory):
    from expo_ray.demo.tiny import build_tiny_pair

    sft, aligned = build_tiny_pair(tmp_path_factory.mktemp("hub-pair"), hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=4, sft_shard_size=600_000, aligned_shard_size=400_000)
    assert len(list(sft.glob("*.safetensors"))) >= 6 and len(list(aligned.glob("*.safetensors"))) >= 10
    return sft, aligned


@pytest.fixture(scope="module")
def hub(many_shard_pair):
    server = HubServer()
    sft, aligned = many_shard_pair
    server.add("org/sft", sft)
    server.add("org/aligned", aligned)
    yield server
    server.close()


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """huggingface_hub talks to the local server, with an empty cache (it read HF_HUB_OFFLINE at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    hub.reset_counts()
    return hub


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def test_planning_reads_headers_only(online, many_shard_pair):
    sft, aligned = many_shard_pair
    plan = make_plan("hf://org/sft", "hf://org/aligned", ALPHAS)
    assert plan.aligned_uri.startswith("hf://org/aligned@") and len(plan.aligned_uri.split("@")[1]) == 40
    total = _checkpoint_bytes(sft) + _checkpoint_bytes(aligned)
    served = online.bytes_served()
    assert 0 < served < 0.01 * total, f"planning transferred {served} of {total} bytes"
    local = make_plan(str(sft), str(aligned), ALPHAS)
    assert [[(t.name, t.action, t.scale) for t in s.tensors] for s in plan.shards] == \
        [[(t.name, t.action, t.scale) for t in s.tensors] for s in local.shards]


def test_a_run_reads_each_input_byte_once_and_writes_what_the_local_run_writes(online, ray_local, many_shard_pair,
                                                                               tmp_path):
    sft, aligned = many_shard_pair
    extrapolate(str(sft), str(aligned), ALPHAS, str(tmp_path / "local"), show_progress=False)
    online.reset_counts()
    extrapolate("hf://org/sft", "hf://org/aligned", ALPHAS, str(tmp_path / "hub"), show_progress=False)

    for repo, folder in (("org/sft", sft), ("org/aligned", aligned)):
        for shard in sorted(folder.glob("*.safetensors")):
            covered = bytearray(shard.stat().st_size)
            for r, path, start, end in online.served:
                if r == repo and path == shard.name:
                    for i in range(start, end):
                        covered[i] += 1
            assert max(covered[64 * 1024:] or [1]) == 1, f"{repo}/{shard.name}: a byte was read twice"
            data_start = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
            assert min(covered[data_start:]) == 1, f"{repo}/{shard.name}: tensor bytes not read"
            assert max(covered[:data_start]) <= 2, f"{repo}/{shard.name}: header read more than twice"
    served = online.bytes_served(suffix=".safetensors")
    inputs = sum(p.stat().st_size for f in (sft, aligned) for p in f.glob("*.safetensors"))
    assert inputs <= served < inputs * 1.01

    for alpha_dir in sorted((tmp_path / "local").iterdir()):
        if not alpha_dir.is_dir() or alpha_dir.name.startswith("."):
            continue
        other = tmp_path / "hub" / alpha_dir.name
        shards = sorted(p.name for p in alpha_dir.glob("*.safetensors"))
        assert shards and shards == sorted(p.name for p in other.glob("*.safetensors"))
        same, differ, missing = filecmp.cmpfiles(alpha_dir, other,
                                                 shards + ["model.safetensors.index.json", "config.json",
                                                           "tokenizer.json"], shallow=False)
        assert not differ and not missing, f"{alpha_dir.name}: {differ or missing} differ from the local-folder run"


def test_files_in_the_local_cache_are_not_fetched_again(online, many_shard_pair):
    from huggingface_hub import hf_hub_download

    from expo_ray.storage.hub import cache_dir

    sft, _ = many_shard_pair
    shard = sorted(p.name for p in sft.glob("*.safetensors"))[0]
    store = open_storage("hf://org/sft")
    hf_hub_download("org/sft", shard, revision=store.commit, cache_dir=cache_dir())  # into the test's cache
    online.reset_counts()
    with store.open_reader(shard) as reader:
        assert reader.read(0, reader.size) == (sft / shard).read_bytes()
    assert online.bytes_served() == 0


def test_offline_from_a_populated_cache(online, many_shard_pair, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    from expo_ray.storage.hub import cache_dir

    sft, aligned = many_shard_pair
    for repo in ("org/sft", "org/aligned"):
        snapshot_download(repo, cache_dir=cache_dir())
    online_plan = make_plan("hf://org/sft", "hf://org/aligned", ALPHAS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    online.reset_counts()
    plan = make_plan("hf://org/sft", "hf://org/aligned", ALPHAS)
    assert plan.aligned_uri == online_plan.aligned_uri and online.bytes_served() == 0 and online.api_calls == 0
    monkeypatch.setenv("HF_HUB_CACHE", str(Path(cache_dir()).parent / "empty-cache"))
    with pytest.raises(StorageError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        open_storage("hf://org/sft")


def test_gated_model_needs_hf_token(online, many_shard_pair, monkeypatch):
    sft, _ = many_shard_pair
    online.token = "hf_test_token_1234"
    try:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(StorageError, match="refused access .HTTP 401; a gated or private model needs HF_TOKEN"):
            open_storage("hf://org/sft")
        monkeypatch.setenv("HF_TOKEN", online.token)
        store = open_storage("hf://org/sft")
        assert store.read_bytes("config.json") == (sft / "config.json").read_bytes()
        assert online.token not in store.describe("config.json")
    finally:
        online.token = None


def test_evaluation_snapshots_take_only_what_vllm_loads(online, many_shard_pair, tmp_path):
    from expo_ray.evaluation.models import local_copy, model_config

    _, aligned = many_shard_pair
    repo = tmp_path / "llama3-like"
    shutil.copytree(aligned, repo)
    (repo / "original").mkdir()
    for junk in ("original/consolidated.00.pth", "pytorch_model.bin", "consolidated.safetensors"):
        (repo / junk).write_bytes(b"\0" * 100_000)
    (repo / "chat_template.jinja").write_text("{{ messages }}")
    online.add("org/llama3-like", repo)
    online.reset_counts()  # a reward model's config: read through storage, not by copying the model
    assert model_config("hf://org/llama3-like") == json.loads((aligned / "config.json").read_text())
    assert online.bytes_served() == (aligned / "config.json").stat().st_size
    folder = Path(local_copy("hf://org/llama3-like", "unused-for-hub"))
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    wanted = {p.name for p in aligned.iterdir()} | {"chat_template.jinja"}
    assert got == sorted(wanted), f"snapshot holds {got}"
    assert online.bytes_served(suffix=".pth") == online.bytes_served(suffix=".bin") == 0
