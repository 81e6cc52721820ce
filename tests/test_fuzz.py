"""Property-based fuzzing of everything expo-ray reads from users: safetensors headers, index files,
config files, manifests and sweep specs. For any generated input, `inspect`, `extrapolate --dry-run`,
`verify` and `sweep --check` exit 0 or 1, say what is wrong in one `error:` line (verify: its
FAILED report), never raise a traceback, never hang (each example runs under a timer) and never
leave a committed variant behind. Examples are derandomized so CI runs are reproducible."""
import json
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from expo_ray.checkpoint.folder import MANIFEST_FILE
from expo_ray.checkpoint.safetensors_io import ITEMSIZE, encode_header
from expo_ray.cli import main
from expo_ray.publish.manifest import FORMAT, file_record, find_variants, verify_variant
from expo_ray.storage import LocalStorage

EXAMPLE_TIMEOUT_S = 20
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4,
          "vocab_size": 4}
NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight", "", "../x", "a" * 300]

scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                                                  | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
deep_text = st.integers(1, 150_000).map(lambda d: "[" * d + "]" * d)


@contextmanager
def time_limit(seconds: int):
    def expired(*_):
        raise TimeoutError(f"example took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(*args) -> tuple[int, str]:
    """Runs the command in-process under a timer; returns (exit code, output). Any exception other
    than a clean exit is a failure of the property."""
    with time_limit(EXAMPLE_TIMEOUT_S):
        result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 1), (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1 and args[0] != "verify":
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.output
    return result.exit_code, result.output


def no_committed_variant(folder: Path) -> bool:
    if not folder.exists():
        return True
    root = LocalStorage(folder)
    return not any(verify_variant(root.child(v) if v else root).ok for v in find_variants(root))


def shard_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header, _ = encode_header([(n, {"float32": "F32"}[str(a.dtype)], a.shape)
                               for n, a in tensors.items()], {"format": "pt"})
    return header + b"".join(a.tobytes() for a in tensors.values())


def write_model(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((4, 4), dtype=np.float32),
               "model.layers.0.mlp.up_proj.weight": rng.standard_normal((4, 4), dtype=np.float32)}
    (folder / "model.safetensors").write_bytes(shard_bytes(tensors))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzpair")
    return write_model(root / "sft", 0), write_model(root / "aligned", 1)


@pytest.fixture
def scratch():
    """A fresh folder per example (function-scoped fixtures are shared by all of a test's examples)."""
    made = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="expo-fuzz-")))
        return made[-1]
    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


# --- safetensors headers --------------------------------------------------------------------------

entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(list(ITEMSIZE) + ["F13", "", "f32"]) | json_values,
    "shape": st.lists(st.integers(-3, 2 ** 64), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2 ** 64), min_size=0, max_size=3) | json_values,
    "extra": json_values,
})
header_json = (st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=10), entry | json_values, max_size=4)
               .map(json.dumps) | json_values.map(json.dumps) | deep_text | st.text(max_size=40))


@FUZZ
@given(header=header_json, data=st.binary(max_size=96), length=st.none() | st.integers(0, 2 ** 64 - 1),
       garbage=st.booleans())
def test_any_safetensors_header(scratch, header, data, length, garbage):
    folder = scratch()
    body = header.encode("utf-8", "surrogatepass") if not garbage else header.encode("utf-8", "surrogatepass")[::-1]
    prefix = struct.pack("<Q", len(body) if length is None else length)
    (folder / "model.safetensors").write_bytes(prefix + body + data)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    run("inspect", folder)


# --- index files ----------------------------------------------------------------------------------

index_json = (st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8),
                                                                   st.sampled_from(["model.safetensors",
                                                                                    "../model.safetensors",
                                                                                    "sub/model.safetensors", "x.bin",
                                                                                    "", "/etc/passwd"]) | json_values,
                                                                   max_size=4) | json_values},
                                    optional={"metadata": json_values}).map(json.dumps)
              | json_values.map(json.dumps) | deep_text | st.text(max_size=30))


@FUZZ
@given(index=index_json)
def test_any_index_file(pair, scratch, index):
    folder = scratch() / "model"
    shutil.copytree(pair[1], folder)
    (folder / "model.safetensors.index.json").write_text(index, encoding="utf-8", errors="surrogatepass")
    run("inspect", folder)


# --- config files ---------------------------------------------------------------------------------

config_json = (st.dictionaries(st.sampled_from(list(CONFIG) + ["tie_word_embeddings", "head_dim",
                                                               "num_key_value_heads"]),
                               json_values, max_size=6).map(lambda d: json.dumps({**CONFIG, **d}))
               | json_values.map(json.dumps) | deep_text | st.text(max_size=30))


@FUZZ
@given(config=config_json, flags=st.sets(st.sampled_from(["--allow-added-rows", "--copy-unmatched",
                                                          "--allow-nonfinite"])))
def test_any_config_file(pair, scratch, config, flags):
    root = scratch()
    aligned = root / "aligned"
    shutil.copytree(pair[1], aligned)
    (aligned / "config.json").write_text(config, encoding="utf-8", errors="surrogatepass")
    run("extrapolate", "--sft", pair[0], "--aligned", aligned, "--alpha", "0.5", "--out", root / "out", "--dry-run",
        *sorted(flags))
    assert not (root / "out").exists()


# --- manifests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """A variant folder as a commit leaves it (shard, index, config, manifest)."""
    folder = write_model(tmp_path_factory.mktemp("fuzzvariant") / "alpha_0.5", 2)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors",
                                        "model.layers.0.mlp.up_proj.weight": "model.safetensors"}}))
    store = LocalStorage(folder)
    files = [file_record(store, k) for k in ("model.safetensors", "model.safetensors.index.json", "config.json")]
    manifest = {"format": FORMAT, "variant": "alpha_0.5", "alpha": 0.5, "fingerprint": "0" * 64, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert verify_variant(store).ok
    return folder, manifest


record = st.fixed_dictionaries({}, optional={"path": st.sampled_from(["model.safetensors", "config.json", "../x",
                                                                      "missing.safetensors", ""]) | json_values,
                                             "size": st.integers(-1, 2 ** 40) | json_values,
                                             "sha256": st.sampled_from(["0" * 64, "zz"]) | json_values})


@FUZZ
@given(files=st.lists(record | json_values, max_size=4) | json_values, keep=st.integers(0, 3),
       other=st.dictionaries(st.sampled_from(["format", "variant", "alpha", "fingerprint", "sources"]), json_values,
                             max_size=2),
       raw=st.none() | deep_text | st.text(max_size=30))
def test_any_manifest(variant, scratch, files, keep, other, raw):
    folder = scratch() / "alpha_0.5"
    shutil.copytree(variant[0], folder)
    manifest = dict(variant[1], **other)
    if isinstance(files, list):
        files = variant[1]["files"][:keep] + files
    manifest["files"] = files
    (folder / MANIFEST_FILE).write_text(raw if raw is not None else json.dumps(manifest), encoding="utf-8",
                                        errors="surrogatepass")
    code, output = run("verify", folder)
    if code == 0:  # only a manifest that really describes the folder passes
        assert manifest["format"] == FORMAT and "ok" in output


# --- sweep specs ----------------------------------------------------------------------------------

def spec_documents(pair_paths):
    sft, aligned = map(str, pair_paths)
    pair_entry = st.fixed_dictionaries({}, optional={
        "sft": st.sampled_from([sft, aligned, "/nonexistent", "hf://"]) | json_values,
        "aligned": st.sampled_from([aligned, sft]) | json_values,
        "name": st.sampled_from(["p", "bad name", ""]) | json_values,
        "alphas": st.lists(st.floats(allow_nan=True) | st.integers(-2, 2), max_size=3) | json_values,
        "mode": st.sampled_from(["grid", "search", "x"]), "budget": json_values,
        "rules": st.fixed_dictionaries({}, optional={
            "scale": st.lists(st.sampled_from(["*=2", "*=-1", "*=1e308", "x"]), max_size=2) | json_values,
            "layer_scales": st.sampled_from(["1,1,1", "1,2", "a,b,c"]) | json_values,
            "exclude": st.lists(st.text(max_size=6), max_size=2) | json_values}),
        "copy_unmatched": json_values, "allow_added_rows": json_values})
    return st.fixed_dictionaries({}, optional={
        "destination": st.sampled_from(["DEST", aligned, "hf://org/x"]) | json_values,
        "alphas": st.lists(st.floats() | st.integers(-2, 3), max_size=3) | json_values,
        "pairs": st.lists(pair_entry, max_size=2) | json_values,
        "chunk_mib": st.sampled_from([1, 0.5, -1, float("inf"), 1e9]) | json_values,
        "evaluation": json_values,
        "unknown": json_values})


@FUZZ
@given(data=st.data(), extra=st.none() | deep_text | st.text(max_size=30) | st.just("alphas: [0.1]\nalphas: [0.2]\n"))
def test_any_sweep_spec(pair, scratch, data, extra):
    root = scratch()
    document = data.draw(spec_documents(pair))
    text = yaml.safe_dump(document, allow_unicode=True).replace("DEST", str(root / "dest"))
    if extra is not None:
        text = extra if data.draw(st.booleans()) else text + "\n" + extra
    spec = root / "spec.yaml"
    spec.write_text(text, encoding="utf-8", errors="surrogatepass")
    run("sweep", "--check", spec)
    assert no_committed_variant(root / "dest") and no_committed_variant(pair[1])
