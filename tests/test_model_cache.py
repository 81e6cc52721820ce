"""The bounded local model cache (expo_ray.evaluation.model_cache) with tiny variants in a real S3
server: the cap holds over a sweep, least recently used models go first, models an engine process
uses stay, and a model that cannot fit is refused with one line."""
from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_bucket, upload_folder

from expo_ray.api import extrapolate
from expo_ray.evaluation.model_cache import COMPLETE, LEASES, CacheFull, ModelCache
from expo_ray.evaluation.models import local_copy, models_to_evaluate

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@pytest.fixture(scope="module")
def variants(ray_local, s3_client, bf16_pair, tmp_path_factory):
    """Six committed variants in S3 (and alpha 0, the aligned model, in S3 too), as models_to_evaluate gives them."""
    sft, aligned = bf16_pair
    make_bucket(s3_client, "cache-test")
    aligned_uri = upload_folder(s3_client, aligned, "cache-test", "aligned")
    local = tmp_path_factory.mktemp("cache-variants")
    extrapolate(str(sft), str(aligned), ALPHAS, str(local), show_progress=False)
    upload_folder(s3_client, local, "cache-test", "variants")
    refs = [r for r in models_to_evaluate("s3://cache-test/variants") if r.alpha in ALPHAS]
    assert [r.alpha for r in refs] == list(ALPHAS)
    return refs, local, aligned_uri


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".expo-ray" not in p.parts)


def test_a_sweep_stays_under_the_cap_and_evicts_least_recently_used(variants, tmp_path):
    refs, local, _ = variants
    size = _model_bytes(local / refs[0].label)
    cache = ModelCache(tmp_path / "cache", cap_bytes=int(2.5 * size))
    serving = None
    sizes = []
    for ref in refs:  # one engine: serve a model, then swap to the next and release the previous
        path = cache.checkout(ref.uri, ref.identity)
        if serving:
            cache.release(serving)
        serving = path
        sizes.append(cache.used())
        assert cache.used() <= cache.cap
        folder = local / ref.label
        shards = [p.name for p in folder.glob("*.safetensors")] + ["config.json", "model.safetensors.index.json"]
        assert filecmp.cmpfiles(folder, path, shards, shallow=False)[0] == shards
        assert (Path(path) / "manifest.json").is_file() and not (Path(path) / ".expo-ray").exists()
    assert max(sizes) <= 2.5 * size and len(cache.entries()) == 2
    assert [Path(p).name for p in cache.entries()] == [refs[-2].identity[:32], refs[-1].identity[:32]]
    # Used again: a hit (no copy), and it becomes the most recently used.
    again = cache.checkout(refs[-2].uri, refs[-2].identity)
    assert Path(again).name == refs[-2].identity[:32] and cache.entries()[-1] == Path(again)


def test_models_in_use_are_never_evicted(variants, tmp_path):
    refs, local, _ = variants
    size = _model_bytes(local / refs[0].label)
    cache = ModelCache(tmp_path / "cache", cap_bytes=int(2.5 * size))
    held = cache.checkout(refs[0].uri, refs[0].identity)          # an engine keeps serving this one
    second = cache.checkout(refs[1].uri, refs[1].identity)
    cache.release(second)
    cache.checkout(refs[2].uri, refs[2].identity)                  # evicts refs[1], not the older refs[0]
    names = {p.name for p in cache.entries()}
    assert Path(held).name in names and Path(second).name not in names
    with pytest.raises(CacheFull) as err:                            # both cached models are in use
        cache.checkout(refs[3].uri, refs[3].identity)
    message = str(err.value)
    assert "\n" not in message and refs[3].uri in message and "engines are using" in message
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".partial-")], "a refused copy left files"


def test_a_lease_of_a_process_that_is_gone_does_not_count(variants, tmp_path):
    refs, local, _ = variants
    size = _model_bytes(local / refs[0].label)
    cache = ModelCache(tmp_path / "cache", cap_bytes=int(1.5 * size))
    first = Path(cache.checkout(refs[0].uri, refs[0].identity))
    cache.release(first)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache.root / LEASES / f"{first.name}--{int(dead.stdout)}--deadbeef").touch()
    cache.checkout(refs[1].uri, refs[1].identity)
    assert [p.name for p in cache.entries()] == [refs[1].identity[:32]]


def test_a_model_larger_than_the_cap_is_refused_with_one_line(variants, tmp_path, monkeypatch):
    refs, local, aligned_uri = variants
    monkeypatch.setenv("EXPO_RAY_MODEL_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("EXPO_RAY_MODEL_CACHE_GB", "0.0001")  # about 105 kB, less than one tiny model
    assert _model_bytes(local / refs[0].label) > 0.0001 * 1024 ** 3
    with pytest.raises(CacheFull) as err:
        local_copy(refs[0].uri, refs[0].identity)
    message = str(err.value)
    assert "\n" not in message and "more than the local model cache's cap of 0.0001 GiB" in message
    assert str(tmp_path / "env-cache") in message and "--model-cache-gb" in message
    assert not [p for p in (tmp_path / "env-cache").iterdir() if p.name != LEASES and p.name != ".lock"]
    monkeypatch.setenv("EXPO_RAY_MODEL_CACHE_GB", "1")
    path = Path(local_copy(aligned_uri, "aligned-identity"))
    assert path.parent == tmp_path / "env-cache" and (path / COMPLETE).is_file()
