"""Helpers the tests share: tiny checkpoints the package does not build, reading tensors and
storage back, an S3 bucket's files, a Hugging Face cache laid out as a download leaves it, what a
loader sees in a variant folder, faults (a replaced shard, a frozen endpoint, a command killed
mid-run), and the vLLM tests' common settings."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import torch

try:
    import vllm  # noqa: F401

    HAVE_VLLM, NO_VLLM_REASON = True, ""
except Exception as exc:  # noqa: BLE001 - any import failure: no usable vLLM here
    HAVE_VLLM, NO_VLLM_REASON = False, f"vLLM is not importable ({type(exc).__name__}: {exc})"

# What the vLLM tests ask tiny models, and how they start engines for them.
PROMPTS = [
    "Explain how a rainbow forms after the rain.",
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Hi",
]
ENGINE = dict(dtype="float32", max_model_len=512)


def note_timing(name: str, seconds: float) -> None:
    """A timing line in the test log (pytest -s shows it): engine start-up varies with the machine."""
    print(f"[vllm timing] {name}: {seconds:.2f} s")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def build_pair(root: str | os.PathLike, *, added_vocab: int = 0, **kwargs) -> tuple[Path, Path]:
    """:func:`expo_ray.demo.tiny.build_tiny_pair`, and with ``added_vocab=N`` an aligned model with
    N more embedding (and lm_head) rows, a config ``vocab_size`` N larger and N more special tokens
    ``<|extra_i|>`` in its tokenizer (added vocabulary, as some DPO recipes leave it)."""
    from expo_ray.demo.tiny import build_tiny_pair

    sft, aligned = build_tiny_pair(root, **kwargs)
    if added_vocab:
        _add_vocab(aligned, added_vocab, kwargs.get("seed", 0))
    return sft, aligned


def _add_vocab(folder: Path, n: int, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    from expo_ray.demo.tiny import build_tokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 29)
    with torch.no_grad():
        model.resize_token_embeddings(vocab + n, mean_resizing=False)
        emb = model.get_input_embeddings().weight
        emb[vocab:] = (torch.randn(n, hidden, generator=gen) * 0.02).to(emb.dtype)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head[vocab:] = (torch.randn(n, hidden, generator=gen) * 0.02).to(head.dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size=max(1, total // 5))
    build_tokenizer(folder, vocab_size=vocab, extra_tokens=[f"<|extra_{i}|>" for i in range(n)],
                    model_max_length=model.config.max_position_embeddings)


def build_unrelated(out_dir: str | os.PathLike, *, seed: int = 1234, shard_size: int | str | None = None,
                    **kwargs) -> Path:
    """A model shaped like :func:`build_pair`'s but independently initialised (another seed): it
    shares no lineage with the pair, what a lineage check should warn about. Returns ``out_dir``."""
    from expo_ray.demo.tiny import build_tiny_pair

    with tempfile.TemporaryDirectory() as tmp:
        sft, _ = build_tiny_pair(tmp, seed=seed, sft_shard_size=shard_size, **kwargs)
        shutil.copytree(sft, out_dir)
    return Path(out_dir)


def shard_names(n: int) -> list[str]:
    """transformers' shard file names for ``n`` shards (``model.safetensors`` when ``n == 1``)."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None,
    shard_size_bytes: int,
    *,
    metadata: Mapping[str, str] | None = None,
    always_index: bool = False,
    tokenizer_vocab_size: int | None = None,
) -> Path:
    """Write ``tensors`` (in the given order) as a sharded safetensors checkpoint.

    A new shard starts when adding the next tensor would pass ``shard_size_bytes`` (a tensor is
    never split). Writes the shards, ``model.safetensors.index.json`` (when there is more than one
    shard, or ``always_index``), ``config.json`` (if ``config`` is given) and, if
    ``tokenizer_vocab_size`` is given, tokenizer files from :func:`build_tokenizer`.
    Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    if shard_size_bytes <= 0:
        raise ValueError("shard_size_bytes must be > 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    current = 0
    total = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        total += size
        if groups[-1] and current + size > shard_size_bytes:
            groups.append([])
            current = 0
        groups[-1].append(name)
        current += size
    names = shard_names(len(groups))
    if always_index and len(groups) == 1:
        names = ["model-00001-of-00001.safetensors"]
    meta = {"format": "pt", **dict(metadata or {})}
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, groups):
        save_file({k: tensors[k].contiguous() for k in group}, str(out / fname), metadata=meta)
        weight_map.update({k: fname for k in group})
    if len(groups) > 1 or always_index:
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    if config is not None:
        _write_json(out / "config.json", dict(config))
    if tokenizer_vocab_size is not None:
        from expo_ray.demo.tiny import build_tokenizer

        build_tokenizer(out, vocab_size=tokenizer_vocab_size)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------


def load_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in ``folder`` (a tensor in two shards is an error)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        part = load_file(str(shard))
        assert not set(part) & set(tensors), f"{shard}: tensors also in another shard"
        tensors.update(part)
    assert tensors, f"{folder}: no safetensors shards"
    return tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its width (so NaN == NaN and -0.0 != 0.0)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape
    return torch.equal(bits(a), bits(b))


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shards_only(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.endswith(".safetensors")}


# ---------------------------------------------------------------------------------------------
# S3 and the Hugging Face cache
# ---------------------------------------------------------------------------------------------


def make_bucket(client, bucket: str) -> None:
    try:
        client.create_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - SeaweedFS answers BucketAlreadyExists for its own bucket
        if "BucketAlready" not in str(exc):
            raise


def upload_folder(client, folder, bucket: str, prefix: str) -> str:
    """Copy a local folder to s3://bucket/prefix; returns the URI."""
    make_bucket(client, bucket)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def s3_files(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def delete_prefix(client, bucket: str, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=o["Key"])


def hf_cache_entry(cache: Path, repo: str, files: Path | Mapping[str, bytes], kind: str = "models") -> str:
    """``files`` (a folder, or name -> bytes) laid out as huggingface_hub's cache keeps a download
    of ``repo`` (kind "models" or "datasets"); returns the commit it is filed under."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = cache / f"{kind}--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    if isinstance(files, Path):
        shutil.copytree(files, snapshot)
    else:
        for name, data in files.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(data)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return commit


# ---------------------------------------------------------------------------------------------
# What loaders see, and faults
# ---------------------------------------------------------------------------------------------


def loader_view(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Tensor name -> the files holding it, over every ``*.safetensors`` of ``folder`` found the way
    vLLM finds them (``glob.glob(folder/*.safetensors)``; vLLM then keeps only the files an index
    names when there is one, transformers and vLLM without an index load them all)."""
    from safetensors import safe_open

    seen: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                seen.setdefault(name, []).append(os.path.basename(path))
    return seen


def assert_holds_exactly_its_manifest(folder: str | os.PathLike) -> None:
    """``folder`` verifies, and a loader reading every ``*.safetensors`` there gets exactly the
    tensors of the shards its manifest lists, each once (and every file a loader reads is listed)."""
    from safetensors import safe_open

    from expo_ray.publish.manifest import verify_variant
    from expo_ray.storage import LocalStorage

    folder = Path(folder)
    result = verify_variant(LocalStorage(folder))
    assert result.ok, result.problems
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {r["path"] for r in manifest["files"]}
    present = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")} - {"manifest.json"}
    assert present == listed, (sorted(present - listed), sorted(listed - present))
    expected = set()
    for shard in sorted(p for p in listed if p.endswith(".safetensors")):
        with safe_open(str(folder / shard), "pt") as f:
            expected.update(f.keys())
    view = loader_view(folder)
    assert {n: v for n, v in view.items() if len(v) > 1} == {}, "tensors in more than one file"
    assert set(view) == expected


def reorder_tensors(path: str | os.PathLike) -> tuple[str, str]:
    """Rewrite a safetensors file with the data of two same-shaped tensors exchanged and its header
    updated to match: a valid file of the same size and tensor names, the tensors in another order
    (what a re-upload of a checkpoint saved by other code can be). Returns the two names."""
    path = Path(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    groups: dict = {}
    for name, entry in header.items():
        groups.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(name)
    x, y = next(names[:2] for names in groups.values() if len(names) >= 2)
    (xa, xb), (ya, yb) = header[x]["data_offsets"], header[y]["data_offsets"]
    data = bytearray(raw[8 + n:])
    data[xa:xb], data[ya:yb] = raw[8 + n + ya:8 + n + yb], raw[8 + n + xa:8 + n + xb]
    header[x]["data_offsets"], header[y]["data_offsets"] = [ya, yb], [xa, xb]
    body = json.dumps({**({"__metadata__": meta} if meta is not None else {}), **header},
                      separators=(",", ":")).encode()
    assert len(body) <= n
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(raw[:8] + body + b" " * (n - len(body)) + bytes(data))
    os.replace(temp, path)
    return x, y


@contextlib.contextmanager
def frozen_endpoint():
    """An endpoint URL that accepts connections and never answers (a hung server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        for conn in held:
            conn.close()


EXPO = [sys.executable, "-m", "expo_ray"]


def cli_env(**extra) -> dict:
    """The environment of an `expo-ray` subprocess: a local Ray instance of its own."""
    return dict(os.environ, RAY_ADDRESS="", **{k: str(v) for k, v in extra.items()})


def start_cli(*args, **env) -> subprocess.Popen:
    """`expo-ray ARGS` in its own process group (so that killing it kills its Ray instance too)."""
    return subprocess.Popen([*EXPO, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(**env), start_new_session=True)


def wait_for_stderr(proc: subprocess.Popen, needle: str, timeout: float = 240) -> list[str]:
    """The stderr lines of ``proc`` up to the first holding ``needle``."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if needle in line:
                return lines
    kill_group(proc)
    raise AssertionError(f"no {needle!r} on stderr within {timeout} s: {''.join(lines)}")


def wait_until(predicate, what: str, timeout: float = 240, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended (code {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a command started by start_cli and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


def finish(proc: subprocess.Popen, lines: list[str] = (), timeout: float = 300) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command started by start_cli, once it ends."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return proc.returncode, out, "".join(lines) + err


def error_lines(text: str) -> list[str]:
    """The lines of a command's output that report a failure: `error:` lines and anything of a
    traceback (remote ones included)."""
    return [line for line in text.splitlines()
            if line.startswith(("error:", "Traceback", " ", "\t")) or "ray::" in line or "Error:" in line]


# ---------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------


def assert_greedy_under_transformers(hf_model, prompt_ids, generated, what: str = "", tol: float = 1e-3) -> None:
    """Every generated token is (within ``tol`` of) the argmax of transformers' logits for the
    same token ids: teacher-forced, so one near-tie cannot derail the rest of the check."""
    ids = torch.tensor([list(prompt_ids) + list(generated)])
    with torch.no_grad():
        logits = hf_model(ids).logits[0]
    for j, token in enumerate(generated):
        row = logits[len(prompt_ids) + j - 1]
        assert row[token] >= row.max() - tol, (
            f"{what + ': ' if what else ''}token {j} ({token}) has logit {row[token]:.6f}, "
            f"max {row.max():.6f} at {int(row.argmax())}")


# ---------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------


def build_adapter(base: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, scale: float = 0.05,
                  autocast: bool = True, **lora) -> Path:
    """A PEFT LoRA adapter (``LoraConfig(**lora)``) on the model at ``base``, saved at ``out``, with
    random LoRA matrices (``scale`` * N(0, 1)) and random changes to any other trainable tensor
    (modules_to_save, trained biases), as DPO with PEFT would leave it. ``autocast=False`` keeps
    the adapter in the base model's dtype (PEFT otherwise stores LoRA matrices in float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    peft_model = get_peft_model(model, LoraConfig(**lora), autocast_adapter_dtype=autocast)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
            elif p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * scale * p.float().abs().mean()).to(p.dtype))
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(out)
    return Path(out)


# ---------------------------------------------------------------------------------------------
# Tiny models of the families users run (weight-swap fidelity)
# ---------------------------------------------------------------------------------------------


def family_config(family: str):
    """A tiny random transformers config of ``family`` (hidden <= 256, <= 4 layers) with the
    tiny tokenizer's vocabulary: what tests/test_swap_matrix.py builds pairs of."""
    import transformers

    from expo_ray.demo.tiny import DEFAULT_VOCAB_SIZE, special_token_ids

    common = dict(vocab_size=DEFAULT_VOCAB_SIZE, max_position_embeddings=2048, **special_token_ids())
    llama = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, initializer_range=0.2)
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**llama, **common),
        "llama-1kv": lambda: transformers.LlamaConfig(**{**llama, "num_key_value_heads": 1}, **common),
        "llama-tied": lambda: transformers.LlamaConfig(**llama, tie_word_embeddings=True, **common),
        "qwen2": lambda: transformers.Qwen2Config(**llama, **common),
        "phi3": lambda: transformers.Phi3Config(**{k: v for k, v in llama.items() if k != "head_dim"}, **common),
        "gemma2": lambda: transformers.Gemma2Config(  # small weights: with larger ones it repeats the last input token
            **{**llama, "initializer_range": 0.02}, query_pre_attn_scalar=32, sliding_window=64, **common),
        "gemma": lambda: transformers.GemmaConfig(**llama, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=2048,
                                                initializer_range=0.2,
                                                **{k: v for k, v in common.items() if k != "max_position_embeddings"}),
        "mixtral": lambda: transformers.MixtralConfig(**{**llama, "intermediate_size": 128}, **moe, **common),
        "qwen2-moe": lambda: transformers.Qwen2MoeConfig(
            **{**llama, "intermediate_size": 128}, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=128, decoder_sparse_step=1, **common),
        "deepseek-v2": lambda: transformers.DeepseekV2Config(
            hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32,
            qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, topk_method="greedy", n_group=1,
            topk_group=1, initializer_range=0.2, **common),
    }
    config = configs[family]()
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")
                            if family != "gpt2" else "GPT2LMHeadModel"]
    return config


def build_family_pair(root: str | os.PathLike, family: str, *, dtype: str = "float32", seed: int = 0,
                      delta_scale: float = 0.3) -> tuple[Path, Path]:
    """A tiny (sft, aligned) pair of ``family`` (see :func:`family_config`)."""
    from expo_ray.demo.tiny import build_tiny_pair

    return build_tiny_pair(root, config=family_config(family), dtype=dtype, seed=seed, delta_scale=delta_scale)
