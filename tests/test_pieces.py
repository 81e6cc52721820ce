"""Byte-range pieces: the split, and outputs written by several tasks in disjoint ranges of one
file equal to the same file streamed by one task, with the same block-tree hash."""
from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest
from helpers import make_bucket

from expo_ray.api import make_plan
from expo_ray.checkpoint import hashing
from expo_ray.checkpoint.safetensors_io import encode_header
from expo_ray.extrapolation import kernel, pieces
from expo_ray.options import WriteOptions
from expo_ray.publish.manifest import verify_variant
from expo_ray.publish.run import run_plan
from expo_ray.storage import LocalStorage, open_storage

MIB = 1 << 20


def test_split_covers_every_file_in_block_aligned_ranges():
    sizes = {"a": 100 * MIB + 5, "b": 30 * MIB, "c": 1000}
    for cpus in (1, 2, 8, 64):
        split = pieces.split(sizes, cpus)
        for key, size in sizes.items():
            ranges = split[key]
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(hi == lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:]))
            assert all(lo % hashing.BLOCK == 0 and lo < hi for lo, hi in ranges)
    assert len(pieces.split({"a": 2000 * MIB}, 2)["a"]) == 6      # cpus x PIECES_PER_CPU
    assert len(pieces.split({"a": 2000 * MIB}, 16)["a"]) == 32    # never below MIN_PIECE (64 MiB)
    assert len(pieces.split({"a": 2000 * MIB, "b": 200 * MIB}, 1)["b"]) == 1


def _write_model(folder, tensors):
    """A safetensors file with tensors in the given order (an F32 tensor after 3 F16 values
    starts 6 bytes into the data: a block boundary then falls inside an element)."""
    folder.mkdir(parents=True)
    header, _ = encode_header([(n, d, a.shape) for n, d, a in tensors], {"format": "pt"})
    with open(folder / "model.safetensors", "wb") as f:
        f.write(header)
        for _, _, a in tensors:
            f.write(a.tobytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))


@pytest.fixture(scope="module")
def misaligned_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    rng = np.random.default_rng(0)
    n = 5_000_001  # 20 MB of F32: two 16 MiB blocks
    x0 = rng.standard_normal(n).astype(np.float32) * 0.02
    x1 = x0 + rng.standard_normal(n).astype(np.float32) * 0.001
    h0, h1 = rng.standard_normal(3).astype(np.float16), rng.standard_normal(3).astype(np.float16)
    _write_model(root / "sft", [("a.bias", "F16", h0), ("b.weight", "F32", x0)])
    _write_model(root / "aligned", [("a.bias", "F16", h1), ("b.weight", "F32", x1)])
    return root / "sft", root / "aligned", x1, x0


def test_pieces_write_the_same_bytes_as_one_stream(ray_local, misaligned_pair, tmp_path, monkeypatch, caplog):
    sft, aligned, x1, x0 = misaligned_pair
    plan = make_plan(str(sft), str(aligned), [0.1, 0.5])
    out_pieces, out_stream = tmp_path / "pieces", tmp_path / "stream"
    monkeypatch.setattr(pieces, "MIN_PIECE", hashing.BLOCK)  # split this 20 MB file in two
    split = pieces.split({"model.safetensors": 20 * MIB}, 2)["model.safetensors"]
    assert len(split) == 2
    caplog.set_level(logging.INFO, logger="expo_ray")
    run_plan(plan, str(out_pieces), write=WriteOptions(chunk_mib=4), show_progress=False)  # ranged: one file, two tasks
    assert "2 output file(s) in 2 piece(s)" in caplog.text
    run_plan(plan, str(out_stream), write=WriteOptions(chunk_mib=4, sha256=True),
             show_progress=False)  # sha256: one stream
    for alpha in ("0.1", "0.5"):
        a = (out_pieces / f"alpha_{alpha}" / "model.safetensors").read_bytes()
        b = (out_stream / f"alpha_{alpha}" / "model.safetensors").read_bytes()
        assert a == b
        n = struct.unpack("<Q", a[:8])[0]
        got = np.frombuffer(a[8 + n + 6:], dtype=np.uint32)
        want = kernel.extrapolate("F32", x1.view(np.uint32), x0.view(np.uint32), [float(alpha)])[0]
        assert np.array_equal(got, want)
        records = [json.loads((out / f"alpha_{alpha}" / "manifest.json").read_text())["files"]
                   for out in (out_pieces, out_stream)]
        tree = [next(r for r in rs if r["path"] == "model.safetensors")[hashing.TREE] for rs in records]
        assert tree[0] == tree[1] == hashing.digest_bytes(a)[hashing.TREE]
        assert verify_variant(LocalStorage(out_pieces / f"alpha_{alpha}")).ok
    leftovers = [p.name for p in out_pieces.rglob("*") if p.name.startswith(".expo-partial-")]
    assert not leftovers


def test_pieces_upload_parts_of_one_s3_object(ray_local, s3_client, misaligned_pair, tmp_path, monkeypatch):
    """On S3 the pieces send independent parts of one multipart upload; the object equals the
    local file and nothing is left half uploaded."""
    sft, aligned, _, _ = misaligned_pair
    plan = make_plan(str(sft), str(aligned), [0.3])
    make_bucket(s3_client, "pieces")
    monkeypatch.setattr(pieces, "MIN_PIECE", hashing.BLOCK)
    run_plan(plan, "s3://pieces/run", write=WriteOptions(chunk_mib=4), show_progress=False)
    run_plan(plan, str(tmp_path), write=WriteOptions(chunk_mib=4), show_progress=False)
    head = s3_client.head_object(Bucket="pieces", Key="run/alpha_0.3/model.safetensors", PartNumber=1)
    assert head["PartsCount"] == 2
    remote = s3_client.get_object(Bucket="pieces", Key="run/alpha_0.3/model.safetensors")["Body"].read()
    assert remote == (tmp_path / "alpha_0.3" / "model.safetensors").read_bytes()
    assert verify_variant(open_storage("s3://pieces/run/alpha_0.3")).ok
    assert not s3_client.list_multipart_uploads(Bucket="pieces").get("Uploads")
