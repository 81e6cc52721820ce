"""Which models an evaluation covers, what identifies each one, and a local copy for vLLM.

Only committed variants are evaluated: a folder without manifest.json is refused, and every
variant is checked against its manifest first. alpha = 0 (the aligned model itself) is always
included; the SFT model optionally.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.folder import MANIFEST_FILE, Checkpoint
from ..checkpoint.identity import checkpoint_identity
from ..errors import ExpoError
from ..options import variant_name
from ..publish.commit import ROOT_INDEX
from ..publish.manifest import find_variants, read_manifest, verify_variant
from ..storage import open_storage
from .model_cache import ModelCache, default_root


@dataclass(frozen=True)
class ModelRef:
    label: str          # alpha_0.3, aligned, sft
    alpha: float | None  # None for the SFT model
    uri: str
    identity: str       # changes whenever the weights could differ
    base: str | None = None  # a LoRA adapter (on this base model, the SFT) instead of a model folder


def models_to_evaluate(variants_uri: str, include_sft: bool = False, deep_verify: bool = False) -> list[ModelRef]:
    """The committed variants under `variants_uri` (or the one variant it is), plus alpha 0 and
    optionally the SFT model."""
    root = open_storage(variants_uri)
    folders = ([""] if root.exists(MANIFEST_FILE)
               else [f for f in find_variants(root) if not f.startswith((".expo-ray", "eval"))])
    if not folders:
        raise ExpoError(f"{root.describe()}: no variants here (no folder with {MANIFEST_FILE})")
    refs, sources, forms = [], set(), set()
    for folder in folders:
        store = root.child(folder) if folder else root
        manifest = read_manifest(store)
        if manifest is None:
            raise ExpoError(f"{store.describe()}: no {MANIFEST_FILE}: the variant was never committed (an interrupted "
                            "run?); refusing to evaluate it. Re-run expo-ray extrapolate to finish it.")
        check = verify_variant(store, deep=deep_verify)
        if not check.ok:
            raise ExpoError(f"{store.describe()}: does not match its manifest: {check.problems[0]}")
        sources.add((manifest["sources"]["sft"], manifest["sources"]["aligned"]))
        form = manifest.get("form", "full")  # "adapter": a LoRA on the SFT model (expo_ray.lora)
        forms.add(form)
        refs.append(ModelRef(manifest["variant"], float(manifest["alpha"]), store.uri, manifest["fingerprint"],
                             manifest["sources"]["sft"] if form == "adapter" else None))
    if len(sources) != 1:
        raise ExpoError(f"{root.describe()}: holds variants of different model pairs; evaluate one pair at a time")
    sft, aligned = sources.pop()
    if not any(r.alpha == 0.0 for r in refs):
        refs.append(_aligned_ref(root, sft, aligned, forms))
    if include_sft:
        refs.append(ModelRef("sft", None, sft, checkpoint_identity(sft)))
    return sorted(refs, key=lambda r: (r.alpha is not None, r.alpha or 0.0))


def _aligned_ref(root, sft: str, aligned: str, forms: set[str]) -> ModelRef:
    """alpha 0, the aligned model itself: a model folder, or a LoRA adapter on the SFT model."""
    if forms == {"full"}:
        return ModelRef(variant_name(0.0), 0.0, aligned, checkpoint_identity(aligned))
    if "adapter" not in forms:
        raise ExpoError(f"{root.describe()}: merged variants of a LoRA adapter need alpha 0 merged too (the aligned "
                        "model, the adapter, is not a model folder): extrapolate again with --merge --alpha 0,...")
    from ..lora.plan import adapter_identity

    return ModelRef(variant_name(0.0), 0.0, aligned, adapter_identity(aligned), sft)


def local_path(uri: str) -> str:
    """A local folder holding the model at ``uri``: a local path as it is, a remote one copied
    once (see :func:`local_copy`, keyed by :func:`checkpoint_identity`)."""
    return local_copy(uri, checkpoint_identity(uri)) if "://" in uri else uri


def snapshot_patterns(uri: str) -> list[str]:
    """What vLLM needs of a Hub model: its safetensors shards (those its index names, not a
    ``consolidated.safetensors`` beside them), JSON files, tokenizer and vocabulary files, chat
    templates; never ``*.bin`` or ``original/*.pth``."""
    ckpt = Checkpoint.open(uri, require_config=False)  # headers only
    return ckpt.shards + ["*.json", "*.jinja", "tokenizer*", "vocab*", "merges.txt", "*.tiktoken"]


def local_copy(uri: str, identity: str, cache_dir: str | None = None) -> str:
    """A local folder with the model at `uri` (vLLM loads from local disk): local paths as they are,
    hf:// through the Hugging Face cache (only the files vLLM needs), s3:// copied into the bounded
    local model cache (:mod:`.model_cache`, keyed by identity; this process holds a lease on it)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        from ..storage.hub import cache_dir as hf_cache_dir, endpoint, offline, parse_hf_uri

        repo, revision = parse_hf_uri(uri)
        return snapshot_download(repo, revision=revision, cache_dir=hf_cache_dir(), local_files_only=offline(),
                                 allow_patterns=snapshot_patterns(uri), endpoint=endpoint())
    return ModelCache(cache_dir).checkout(uri, identity,
                                          skip=lambda key: key.startswith(".expo-ray/") or key == ROOT_INDEX)


def release_copy(path: str) -> None:
    """This process no longer serves the model at ``path`` (a folder :func:`local_copy` returned):
    the model cache may evict it."""
    root = default_root()
    if root.is_dir() and Path(path).parent.resolve() == root.resolve():
        ModelCache(root).release(path)


def model_config(uri: str) -> dict | None:
    """``config.json`` of a remote model read through storage (no copy of the model); None for a
    local folder (read there)."""
    if "://" not in uri or uri.startswith("file://"):
        return None
    from ..checkpoint.folder import read_json

    store = open_storage(uri)
    if not store.exists("config.json"):
        raise ExpoError(f"{store.describe('config.json')}: missing; a model folder needs its config.json")
    return read_json(store, "config.json")
