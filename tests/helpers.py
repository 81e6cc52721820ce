"""Helpers the tests share: tiny checkpoints the package does not build, reading tensors and
storage back, an S3 bucket's files, a Hugging Face cache laid out as a download leaves it, and the
vLLM tests' common settings."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
