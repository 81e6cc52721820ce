"""A synthetic, Llama-shaped SFT/aligned pair of a chosen size, written without holding it in RAM.

Tensor names and shapes are those of ``LlamaForCausalLM`` (TinyLlama-like: hidden 2048,
intermediate 5632, 32 heads / 4 KV heads, vocab 32000; smaller widths for small targets), with the
layer count picked to reach the requested size. Values are random bf16 (N(0, 0.02); norms 1 +
noise); aligned = sft + a relative 1e-2 Gaussian delta, computed in float32 and rounded once.

The two checkpoints are sharded differently (by default shards of 25 % and 35 % of the model, i.e.
500 MB vs 700 MB for a 2 GB model) and the aligned one also stores its tensors in another order
(alphabetical, as mergekit writes), so tensors must be paired by name. Each folder gets a valid
``config.json``, ``generation_config.json``, ``model.safetensors.index.json`` and the tokenizer
of ``expo_ray.demo.tiny`` so ``transformers`` loads it.

Usage: python benchmarks/synthetic_pair.py OUT_DIR --size-gb 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GB = 10**9
CHUNK_ELEMS = 16 * 2**20  # elements generated at a time (64 MiB of float32)

# (hidden, intermediate, heads, kv_heads): TinyLlama-1.1B's widths first, then narrower ones.
_WIDTHS = [(2048, 5632, 32, 4), (1024, 2816, 16, 4), (512, 1408, 8, 4), (256, 704, 4, 2)]
VOCAB = 32000


@dataclass(frozen=True)
class Spec:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order transformers' state_dict() lists them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def nbytes(self) -> int:
        return 2 * sum(_numel(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def spec_for_size(size_bytes: float) -> Spec:
    """The widest Llama shape whose embeddings take at most 40 % of the target, layers to fit."""
    for hidden, inter, heads, kv in _WIDTHS:
        base = Spec(hidden, inter, heads, kv, 0)
        fixed = base.nbytes()
        per_layer = Spec(hidden, inter, heads, kv, 1).nbytes() - fixed
        if fixed <= 0.4 * size_bytes or (hidden, inter, heads, kv) == _WIDTHS[-1]:
            layers = max(1, round((size_bytes - fixed) / per_layer))
            return Spec(hidden, inter, heads, kv, layers)
    raise AssertionError("unreachable")


def _layout(tensors, order, shard_bytes):
    """Assign tensors (in ``order``) to shards; return [(file, header_bytes, [(name, shape, begin)])]."""
    shapes = dict(tensors)
    groups: list[list[str]] = [[]]
    cur = 0
    for name in order:
        size = 2 * _numel(shapes[name])
        if groups[-1] and cur + size > shard_bytes:
            groups.append([])
            cur = 0
        groups[-1].append(name)
        cur += size
    n = len(groups)
    files = []
    for k, group in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        header = {"__metadata__": {"format": "pt"}}
        off = 0
        entries = []
        for name in group:
            size = 2 * _numel(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [off, off + size]}
            entries.append((name, shapes[name], off))
            off += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        files.append((fname, struct.pack("<Q", len(raw)) + raw, entries, off))
    return files


def _write_side_files(out: Path, spec: Spec, files) -> None:
    from expo_ray.demo.tiny import build_tokenizer

    weight_map = {name: fname for fname, _, entries, _ in files for name, _, _ in entries}
    total = sum(size for *_, size in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
    build_tokenizer(out)  # 384 tokens; the model's 32000-row embedding is larger, which is allowed


def make_pair(out_root: str | os.PathLike, size_bytes: float, *, seed: int = 0,
              sft_shard_frac: float = 0.25, aligned_shard_frac: float = 0.35,
              delta_rel: float = 1e-2, verbose: bool = True) -> tuple[Path, Path, Spec]:
    """Write ``out_root/sft`` and ``out_root/aligned``; return their paths and the shape spec."""
    spec = spec_for_size(size_bytes)
    tensors = spec.tensors()
    names = [n for n, _ in tensors]
    total = spec.nbytes()
    layouts = {
        "sft": _layout(tensors, names, int(sft_shard_frac * total)),
        "aligned": _layout(tensors, sorted(names), int(aligned_shard_frac * total)),
    }
    root = Path(out_root)
    where: dict[str, dict[str, tuple[int, int]]] = {}  # side -> name -> (fd, absolute offset)
    fds = []
    t0 = time.perf_counter()
    try:
        for side, files in layouts.items():
            d = root / side
            d.mkdir(parents=True, exist_ok=True)
            where[side] = {}
            for fname, header, entries, data_size in files:
                fd = os.open(d / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                fds.append(fd)
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, len(header) + data_size)
                for name, _, begin in entries:
                    where[side][name] = (fd, len(header) + begin)
            _write_side_files(d, spec, files)
        gen = torch.Generator().manual_seed(seed)
        buf = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
        delta = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
        for name, shape in tensors:
            n = _numel(shape)
            is_norm = len(shape) == 1
            for start in range(0, n, CHUNK_ELEMS):
                m = min(CHUNK_ELEMS, n - start)
                x, d_ = buf[:m], delta[:m]
                if is_norm:
                    x.normal_(1.0, 0.05, generator=gen)
                    d_.normal_(0.0, delta_rel, generator=gen)
                else:
                    x.normal_(0.0, 0.02, generator=gen)
                    d_.normal_(0.0, 0.02 * delta_rel, generator=gen)
                sft = x.to(torch.bfloat16)
                aligned = (sft.float().add_(d_)).to(torch.bfloat16)
                for side, t in (("sft", sft), ("aligned", aligned)):
                    fd, off = where[side][name]
                    os.pwrite(fd, t.view(torch.uint8).numpy().data, off + 2 * start)
    finally:
        for fd in fds:
            os.close(fd)
    if verbose:
        print(f"synthetic pair: {spec.layers} layers x hidden {spec.hidden}, {total / GB:.2f} GB per "
              f"model, shards sft {len(layouts['sft'])} / aligned {len(layouts['aligned'])}, "
              f"written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return root / "sft", root / "aligned", spec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--size-gb", type=float, default=0.2, help="bytes per model, in GB (1e9)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_pair(a.out_dir, a.size_gb * GB, seed=a.seed)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
