"""S3 in and out against a real S3-compatible server (SeaweedFS), and hf:// from an offline cache."""
import os

import pytest
from helpers import hf_cache_entry, local_files, make_bucket, s3_files, shards_only, upload_folder

from expo_ray.api import extrapolate
from expo_ray.errors import StorageError
from expo_ray.publish.manifest import verify_variant
from expo_ray.storage import open_storage
from expo_ray.storage.s3 import MAX_PARTS, WINDOW, MiB, S3Storage, part_size_for


def test_s3_to_s3_is_byte_identical_to_local(ray_local, s3_client, bf16_pair, tmp_path):
    sft = upload_folder(s3_client, bf16_pair[0], "models", "tiny/sft")
    aligned = upload_folder(s3_client, bf16_pair[1], "models", "tiny/aligned")
    make_bucket(s3_client, "variants")
    extrapolate(sft, aligned, (0.1, 0.5), "s3://variants/run1", show_progress=False)
    extrapolate(str(bf16_pair[0]), str(bf16_pair[1]), (0.1, 0.5), str(tmp_path), show_progress=False)
    for name in ("alpha_0.1", "alpha_0.5"):
        remote = s3_files(s3_client, "variants", f"run1/{name}")
        local = local_files(tmp_path / name)
        assert shards_only(remote) == shards_only(local) and len(shards_only(local)) > 1
        assert set(remote) == set(local)
        assert verify_variant(open_storage(f"s3://variants/run1/{name}")).ok
    index = s3_client.get_object(Bucket="variants", Key="run1/expo-ray-index.json")["Body"].read()
    assert b'"state": "committed"' in index
    # Receipts are gone after the commit; no multipart upload is left behind.
    assert not s3_files(s3_client, "variants", "run1/.expo-ray")
    assert not s3_client.list_multipart_uploads(Bucket="variants").get("Uploads")


def test_multipart_streaming_and_ranged_reads(s3_server, s3_client):
    make_bucket(s3_client, "blobs")
    store = S3Storage("blobs", "mp", part_mib=8)
    data = os.urandom(21 * MiB + 12345)
    with store.open_writer("big.bin", size_hint=len(data)) as w:
        for i in range(0, len(data), 3 * MiB + 7):   # odd-sized writes
            w.write(data[i:i + 3 * MiB + 7])
        w.commit()
    head = s3_client.head_object(Bucket="blobs", Key="mp/big.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")  # three parts
    with store.open_reader("big.bin") as r:
        assert r.read(0, len(data)) == data     # split into concurrent ranged GETs
        assert r.read(17 * MiB + 5, 1000) == data[17 * MiB + 5:17 * MiB + 1005]
        # Small reads come from whole windows of the object, also across a window boundary.
        for offset, n in ((WINDOW - 100, 200), (2 * WINDOW - 3 * MiB, 3 * MiB + 10), (5, 70000), (WINDOW + 1, 10),
                          (len(data) - 70000, 70000), (len(data) - 1, 1)):
            assert r.read(offset, n) == data[offset:offset + n]
        with pytest.raises(StorageError, match="past the end"):
            r.read(len(data) - 10, 11)
    # An aborted writer leaves nothing: no object, no multipart upload.
    w = store.open_writer("aborted.bin")
    w.write(os.urandom(9 * MiB))
    w.abort()
    assert not store.exists("aborted.bin")
    assert not s3_client.list_multipart_uploads(Bucket="blobs").get("Uploads")
    # Exactly-once creation.
    store.write_bytes("once.json", b"1", if_absent=True)
    with pytest.raises(StorageError, match="already exists"):
        store.write_bytes("once.json", b"2", if_absent=True)
    assert store.read_bytes("once.json") == b"1"


def test_part_size_grows_to_fit_10000_parts():
    assert part_size_for(None, 8 * MiB) == 8 * MiB
    assert part_size_for(10 * 1024 * MiB, 8 * MiB) == 8 * MiB
    huge = 200 * 1024 ** 3  # 200 GiB object
    size = part_size_for(huge, 8 * MiB)
    assert size % MiB == 0 and huge / size < MAX_PARTS


def test_clear_errors_for_missing_bucket_and_key(s3_server):
    with pytest.raises(StorageError, match="s3://no-such-bucket/x/model.safetensors: "
                                           "the bucket does not exist|not found"):
        open_storage("s3://no-such-bucket/x").open_reader("model.safetensors")
    make_bucket(__import__("boto3").client("s3"), "emptybucket")
    with pytest.raises(StorageError, match="emptybucket/nothing/config.json: not found"):
        open_storage("s3://emptybucket/nothing").read_bytes("config.json")


def test_hf_source_from_offline_cache(ray_local, bf16_pair, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    hf_cache_entry(cache, "tiny-org/tiny-sft", bf16_pair[0])
    commit = hf_cache_entry(cache, "tiny-org/tiny-dpo", bf16_pair[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = extrapolate("hf://tiny-org/tiny-sft", "hf://tiny-org/tiny-dpo@main", (0.3,), str(tmp_path / "hub-out"),
                         show_progress=False)
    assert result.variants == {"alpha_0.3": "written"}
    extrapolate(str(bf16_pair[0]), str(bf16_pair[1]), (0.3,), str(tmp_path / "local-out"), show_progress=False)
    assert (shards_only(local_files(tmp_path / "hub-out" / "alpha_0.3"))
            == shards_only(local_files(tmp_path / "local-out" / "alpha_0.3")))
    manifest = (tmp_path / "hub-out" / "alpha_0.3" / "manifest.json").read_text()
    assert f"hf://tiny-org/tiny-dpo@{commit}" in manifest
    with pytest.raises(StorageError, match="not in the local Hugging Face cache"):
        open_storage("hf://tiny-org/not-cached")
