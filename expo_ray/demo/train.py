"""Train the tiny checkpoints of the controlled ExPO experiment on CPU (see :mod:`.task`).

:func:`build_demo_models` trains, from one seed:

* ``sft``: a tiny ``LlamaForCausalLM`` (hidden 64, 2 layers) trained from scratch on
  well-formed responses whose marks are ``!`` 30% of the time (below the preferred three in four);
* ``dpo_small`` and ``dpo_large``: DPO from ``sft`` (reference = ``sft``) on a small share and on
  all of the preference pairs between two well-formed responses, same hyperparameters otherwise
  (so the first is under-trained);
* ``reward``: a ``LlamaForSequenceClassification`` (one label, 4 layers: the SFT model's two and
  two new ones) trained with the Bradley-Terry loss on all the preference pairs, including
  those where a malformed response loses;

and writes the held-out evaluation prompts. Everything is float32 (the DPO delta is small and
bf16 would round much of it away): run vLLM on these with ``dtype="float32"``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import task
from .tiny import build_tokenizer, tiny_config

__all__ = ["SCALES", "Scale", "build_demo_models", "build_version"]

log = logging.getLogger("expo_ray")

VOCAB_SIZE = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
MODEL_KEYS = ("sft", "dpo_small", "dpo_large", "reward")


@dataclass(frozen=True)
class Scale:
    """Data sizes and training lengths of one build."""

    sft_examples: int
    sft_steps: int
    pairs: int
    small_share: float     # share of the pairs the under-trained DPO model sees
    dpo_epochs: int        # the same for both DPO models, so the small one takes fewer steps
    reward_epochs: int
    eval_prompts: int
    num_hidden_layers: int = 2
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    init_std: float = 0.05     # larger than the usual 0.02: the copying circuit forms much sooner
    batch_size: int = 32
    sft_lr: float = 3e-3
    dpo_lr: float = 2e-5
    # A large beta keeps the DPO optimum near the target share of ``!`` (far from "all ``!``"),
    # where the well-trained model ends up; the under-trained one stops short of it.
    dpo_beta: float = 1.0
    reward_lr: float = 1e-3
    reward_extra_layers: int = 2


SCALES = {
    "full": Scale(sft_examples=20000, sft_steps=800, pairs=4000, small_share=0.05, dpo_epochs=2,
                  reward_epochs=2, eval_prompts=256),
    "small": Scale(sft_examples=8000, sft_steps=400, pairs=2000, small_share=0.05, dpo_epochs=4,
                   reward_epochs=2, eval_prompts=128),
}

Progress = Callable[[str], None]


def build_version() -> str:
    """A fingerprint of the training code and task: a cached build from other code is rebuilt."""
    h = hashlib.sha256()
    for module in ("task.py", "train.py", "tiny.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def build_demo_models(out_dir: str | os.PathLike, *, seed: int = 0, scale: str = "full",
                      progress: Progress | None = None) -> dict[str, Path]:
    """Train (or reuse) the demo's checkpoints in ``out_dir``; return their paths.

    Keys: ``"sft"``, ``"dpo_small"``, ``"dpo_large"``, ``"reward"`` (model folders) and
    ``"prompts"`` (a JSONL file of held-out ``{"id", "prompt"}``). ``scale`` is ``"full"`` (the
    demo) or ``"small"`` (tests). If ``out_dir`` holds a complete build of the same seed, scale
    and code version, nothing is trained. Otherwise the build happens in a sibling temporary
    folder that is renamed to ``out_dir`` when complete (a build from other settings in
    ``out_dir`` is replaced), so an interrupted build never looks finished. ``progress`` gets
    one-line progress messages (they are also logged to the ``expo_ray`` logger).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {sorted(SCALES)}")
    out = Path(out_dir).resolve()
    wanted = {"seed": seed, "scale": scale, "version": build_version()}
    if _complete_build(out, wanted):
        return _paths(out)
    if out.exists() and any(out.iterdir()) and not (out / "build.json").exists():
        raise FileExistsError(f"{out} is not empty and holds no demo build; choose another folder")

    say = _reporter(progress)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    began = time.perf_counter()
    threads = torch.get_num_threads()
    # Tiny models: one thread is about as fast as two, and far faster when the cores are busy.
    torch.set_num_threads(1)
    try:
        seconds = _train_all(tmp, seed, SCALES[scale], say)
    finally:
        torch.set_num_threads(threads)
    total = time.perf_counter() - began
    info = {**wanted, "seconds": round(total, 1), "seconds_per_model": seconds,
            "settings": asdict(SCALES[scale])}
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    say(f"demo models ready in {out} ({total:.0f} s)")
    return _paths(out)


def _paths(out: Path) -> dict[str, Path]:
    paths = {key: out / key for key in MODEL_KEYS}
    paths["prompts"] = out / "prompts.jsonl"
    return paths


def _complete_build(out: Path, wanted: dict) -> bool:
    try:
        info = json.loads((out / "build.json").read_text())
    except (OSError, ValueError):
        return False
    if any(info.get(k) != v for k, v in wanted.items()):
        return False
    return all(p.exists() for p in _paths(out).values())


def _reporter(progress: Progress | None) -> Progress:
    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)
    return say


def _train_all(root: Path, seed: int, sc: Scale, say: Progress) -> dict[str, float]:
    """Build the tokenizer, the four models and the prompts into ``root``; return seconds taken
    per model."""
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok_dir = build_tokenizer(root / "tokenizer", vocab_size=VOCAB_SIZE,
                              corpus_lines=task.tokenizer_corpus(seed))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    seconds = {}

    t = time.perf_counter()
    sft = train_sft(tok, task.sft_examples(sc.sft_examples, seed), sc, seed, say)
    _save(sft, root / "sft", tok_dir)
    seconds["sft"] = round(time.perf_counter() - t, 1)

    # DPO learns from the pairs of two well-formed answers (what sampling the SFT model gives);
    # the reward model also from the pairs where a malformed answer loses.
    pairs = task.preference_pairs(sc.pairs, seed)
    dpo_pairs = [p for p in pairs if p.kind == "form"]
    n_small = max(sc.batch_size, round(sc.small_share * len(dpo_pairs)))
    for key, subset in (("dpo_small", dpo_pairs[:n_small]), ("dpo_large", dpo_pairs)):
        t = time.perf_counter()
        model = train_dpo(tok, sft, subset, sc, seed, say, name=key)
        _save(model, root / key, tok_dir)
        seconds[key] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    reward = train_reward(tok, sft, pairs, sc, seed, say)
    _save(reward, root / "reward", tok_dir)
    seconds["reward"] = round(time.perf_counter() - t, 1)

    prompts = task.eval_prompts(sc.eval_prompts, seed)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    shutil.rmtree(tok_dir)
    return seconds


# ---------------------------------------------------------------------------------------------
# Token sequences (exactly what the evaluation pipeline feeds the models)
# ---------------------------------------------------------------------------------------------


def prompt_ids(tok, prompt: str) -> list[int]:
    """The generation prompt: ``<s><|user|>\\nPROMPT</s>\\n<|assistant|>\\n``."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)


def encode_chats(tok, items: list[tuple[str, str]]) -> list[list[int]]:
    """Reward model inputs for many (prompt, response) pairs at once."""
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
             for p, r in items]
    return tok.apply_chat_template(chats, add_generation_prompt=False, tokenize=True,
                                   return_dict=False)


def encode_policy(tok, items: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Prompt + response + EOS (what the policy generates, then stops) for many (prompt,
    response) pairs, each with the index where the response starts."""
    heads = tok.apply_chat_template([[{"role": "user", "content": p}] for p, _ in items],
                                    add_generation_prompt=True, tokenize=True, return_dict=False)
    bodies = tok([r for _, r in items], add_special_tokens=False)["input_ids"]
    return [(h + b + [tok.eos_token_id], len(h)) for h, b in zip(heads, bodies)]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def _policy_batch(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ids, attention mask and a mask of the target tokens (response + EOS)."""
    ids, mask = _pad([e for e, _ in encoded], pad_id)
    target = torch.zeros_like(mask)
    for i, (e, start) in enumerate(encoded):
        target[i, start:len(e)] = 1
    return ids, mask, target


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the target tokens of each row."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * target[:, 1:]).sum(-1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_sft(tok, examples: list[tuple[str, str]], sc: Scale, seed: int, say: Progress):
    """A fresh tiny Llama trained with next-token loss on the responses (+ EOS) of ``examples``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=VOCAB_SIZE, num_hidden_layers=sc.num_hidden_layers,
                         num_key_value_heads=sc.num_key_value_heads,
                         intermediate_size=sc.intermediate_size, dtype="float32")
    config.initializer_range = sc.init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    encoded = encode_policy(tok, examples)
    opt = _optimizer(model, sc.sft_lr)
    sched = _warmup_then_decay(opt, sc.sft_steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, sc.sft_steps + 1):
        idx = torch.randint(len(encoded), (sc.batch_size,), generator=gen).tolist()
        ids, mask, target = _policy_batch([encoded[i] for i in idx], tok.pad_token_id)
        loss = -sequence_logps(model, ids, mask, target).sum() / target[:, 1:].sum()
        _step(opt, loss)
        sched.step()
        if step % 100 == 0 or step == sc.sft_steps:
            say(f"sft step {step}/{sc.sft_steps} loss {loss.item():.3f}")
    return model.eval()


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def _sgd(model, lr: float) -> torch.optim.Optimizer:
    # For DPO. Adam's first steps move every weight by about +-lr whatever its gradient, so a
    # short run's delta is mostly noise, and extrapolating it breaks the model at once; the
    # sum of (momentum) gradient steps points where the preference pulls.
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _warmup_then_decay(opt: torch.optim.Optimizer,
                       steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


def _batches(n: int, size: int, epochs: int, gen: torch.Generator) -> list[list[int]]:
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        out += [order[i:i + size] for i in range(0, n, size)]
    return out


def _pair_logps(model, chosen, rejected, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    logps = sequence_logps(model, *_policy_batch(chosen + rejected, pad_id))
    return logps[:len(chosen)], logps[len(chosen):]


def train_dpo(tok, sft, pairs: list[task.Pair], sc: Scale, seed: int, say: Progress, *,
              name: str = "dpo"):
    """A copy of ``sft`` trained with the DPO loss on ``pairs`` (reference model: ``sft``)."""
    chosen = encode_policy(tok, [(p.prompt, p.chosen) for p in pairs])
    rejected = encode_policy(tok, [(p.prompt, p.rejected) for p in pairs])
    with torch.no_grad():
        ref = [_pair_logps(sft, chosen[i:i + 256], rejected[i:i + 256], tok.pad_token_id)
               for i in range(0, len(pairs), 256)]
    ref_c, ref_r = torch.cat([c for c, _ in ref]), torch.cat([r for _, r in ref])
    model = copy.deepcopy(sft).train()
    opt = _sgd(model, sc.dpo_lr)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = _batches(len(pairs), sc.batch_size, sc.dpo_epochs, gen)
    for step, idx in enumerate(batches, 1):
        pol_c, pol_r = _pair_logps(model, [chosen[i] for i in idx], [rejected[i] for i in idx],
                                   tok.pad_token_id)
        margin = (pol_c - ref_c[idx]) - (pol_r - ref_r[idx])
        loss = -F.logsigmoid(sc.dpo_beta * margin).mean()
        _step(opt, loss)
        if step % 20 == 0 or step == len(batches):
            say(f"{name} step {step}/{len(batches)} loss {loss.item():.3f}")
    return model.eval()


def train_reward(tok, sft, pairs: list[task.Pair], sc: Scale, seed: int, say: Progress):
    """A one-label sequence classifier trained with the Bradley-Terry loss on ``pairs``.

    It starts from the SFT model's layers, which already know how to copy the prompt's words,
    plus ``sc.reward_extra_layers`` new layers on top (starting as the identity), which leave
    room to compare each answer word with the prompt's and sum that up at the last token.
    """
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(sft.config)
    config.architectures = ["LlamaForSequenceClassification"]
    config.num_labels = 1
    config.problem_type = "regression"
    config.num_hidden_layers += sc.reward_extra_layers
    torch.manual_seed(seed + 2)
    model = LlamaForSequenceClassification(config)
    _, unexpected = model.model.load_state_dict(sft.model.state_dict(), strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for layer in model.model.layers[sft.config.num_hidden_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.train()
    chosen = encode_chats(tok, [(p.prompt, p.chosen) for p in pairs])
    rejected = encode_chats(tok, [(p.prompt, p.rejected) for p in pairs])
    opt = _optimizer(model, sc.reward_lr)
    gen = torch.Generator().manual_seed(seed + 3)
    batches = _batches(len(pairs), sc.batch_size, sc.reward_epochs, gen)
    sched = _warmup_then_decay(opt, len(batches))
    for step, idx in enumerate(batches, 1):
        ids, mask = _pad([chosen[i] for i in idx] + [rejected[i] for i in idx], tok.pad_token_id)
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        loss = -F.logsigmoid(rewards[:len(idx)] - rewards[len(idx):]).mean()
        _step(opt, loss)
        sched.step()
        if step % 50 == 0 or step == len(batches):
            say(f"reward step {step}/{len(batches)} loss {loss.item():.3f}")
    return model.eval()


def _save(model, out: Path, tok_dir: Path) -> None:
    """save_pretrained in float32 (safetensors), a generation config and the tokenizer files."""
    from transformers import GenerationConfig

    cfg = model.config
    gen = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                           pad_token_id=cfg.pad_token_id)
    if hasattr(model, "generation_config"):
        model.generation_config = gen
    model.to(torch.float32).save_pretrained(out)
    gen.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy2(tok_dir / name, out / name)
