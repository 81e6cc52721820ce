"""Header validation rejects every malformed file before allocating; byte-range reads."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from expo_ray.checkpoint.safetensors_io import encode_header, read_header, read_rows, read_tensor
from expo_ray.errors import InvalidCheckpoint
from expo_ray.storage import LocalStorage


def raw_file(path, header: dict, data: bytes, length: int | None = None):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def test_reads_real_file_and_rows(tmp_path):
    a = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    b = torch.ones(5, dtype=torch.bfloat16)
    save_file({"a": a, "b": b}, tmp_path / "x.safetensors", metadata={"format": "pt"})
    store = LocalStorage(tmp_path)
    header = read_header(store, "x.safetensors")
    infos = header.by_name()
    assert header.metadata == {"format": "pt"}
    assert infos["a"].shape == (4, 3) and infos["b"].dtype == "BF16"
    with store.open_reader("x.safetensors") as r:
        assert read_tensor(r, infos["a"]) == a.numpy().tobytes()
        assert read_rows(r, infos["a"], 1, 3) == a[1:3].numpy().tobytes()


def test_encode_header_round_trip(tmp_path):
    header, offsets = encode_header([("w", "F16", (2, 3)), ("v", "I64", (1,))], {"format": "pt"})
    assert len(header) % 8 == 0 and offsets == [0, 12]
    (tmp_path / "y.safetensors").write_bytes(header + bytes(20))
    h = read_header(LocalStorage(tmp_path), "y.safetensors")
    assert [t.name for t in h.tensors] == ["w", "v"]


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("header,data,length,problem", [
    (GOOD, bytes(4), None, "truncated"),
    (GOOD, bytes(8), 10**6, "header length 1000000 is larger than the file"),
    (GOOD, bytes(8), 2**40, "exceeds"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "overlaps"),
    ({"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "unknown or unsupported dtype"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None, "needs 12"),
    ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "non-negative"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "gap"),
    (GOOD, bytes(12), None, "trailing"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "data_offsets"),
])
def test_rejects_malformed(tmp_path, header, data, length, problem):
    raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InvalidCheckpoint) as exc:
        read_header(LocalStorage(tmp_path), "bad.safetensors")
    assert "bad.safetensors" in str(exc.value) and problem in str(exc.value)


def test_rejects_duplicate_names_and_non_json(tmp_path):
    body = (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    (tmp_path / "dup.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + bytes(8))
    with pytest.raises(InvalidCheckpoint, match="duplicate key"):
        read_header(LocalStorage(tmp_path), "dup.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x" + bytes(8))
    with pytest.raises(InvalidCheckpoint, match="not valid JSON"):
        read_header(LocalStorage(tmp_path), "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(InvalidCheckpoint, match="too short"):
        read_header(LocalStorage(tmp_path), "tiny.safetensors")
