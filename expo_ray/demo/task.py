"""A synthetic instruction task with a known preference, for the controlled ExPO experiment.

A prompt asks to repeat four random content words (``"repeat: apple river stone cloud"``). A
well-formed response says ``"ok:"`` and then the words in order, each followed by a mark, and
stops: ``"ok: apple! river. stone! cloud!"``. The preferred answer marks three of the four words
with ``!`` and one with ``.``: the score of a well-formed response peaks at three ``!`` and falls
on both sides (:func:`true_score`), so emphasis is good up to a point and shouting every word is
worse again. The SFT data under-uses ``!`` (each mark is ``!`` with probability 0.3), so the SFT
model sits below the target and preference training pulls it towards "more ``!``". The
preference pairs say "closer to three ``!`` is better among well-formed responses, and any
well-formed response beats a malformed one" (a wrong, missing, extra, repeated or swapped word,
a doubled or missing mark, a run of marks in place of words, rambling, gibberish: what a model
pushed too far produces). The words are the same tokens in the prompt and in the response, so
copying and checking them is easy for tiny models.

Everything is deterministic from a seed. :func:`true_score` is the ground truth the pairs are
drawn from; the pipeline never uses it (it scores with the trained reward model), analyses and
tests do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "INSTRUCTION",
    "WORDS",
    "Pair",
    "eval_prompts",
    "is_well_formed",
    "malformed_response",
    "preference_pairs",
    "prompt_words",
    "response",
    "sft_examples",
    "tokenizer_corpus",
    "train_prompts",
    "true_score",
]

INSTRUCTION = "repeat:"
WORDS = (
    "apple", "river", "stone", "cloud", "green", "house", "music", "paper",
    "light", "tiger", "water", "bread", "chair", "dream", "earth", "flame",
    "grass", "horse", "juice", "lemon", "metal", "night", "ocean", "piano",
    "queen", "radio", "snake", "table", "train", "voice", "whale", "zebra",
)
MIN_WORDS, MAX_WORDS = 4, 4   # a fixed length keeps the copying easy for a 2-layer model
LEAD, GOOD, BAD = "ok:", "!", "."
MALFORMED_SCORE = -1.0
SFT_GOOD_SHARE = 0.3  # the SFT data under-uses ``!``: preference training has far to go
TARGET_SHARE = 0.75   # the best answer has three ``!`` out of four: more is worse again


def prompt_text(words: list[str] | tuple[str, ...]) -> str:
    """The instruction for ``words``: ``"repeat: w1 w2 ..."``."""
    return " ".join((INSTRUCTION, *words))


def prompt_words(prompt: str) -> list[str]:
    """The words a prompt asks to repeat (inverse of :func:`prompt_text`)."""
    head, _, rest = prompt.partition(" ")
    if head != INSTRUCTION:
        raise ValueError(f"not a task prompt: {prompt!r}")
    return rest.split()


def response(words: list[str], preferred: list[bool]) -> str:
    """A well-formed response: ``"ok:"``, then ``words`` in order, each followed by ``!`` where
    ``preferred`` says so and by ``.`` elsewhere."""
    marked = (w + (GOOD if p else BAD) for w, p in zip(words, preferred, strict=True))
    return " ".join([LEAD, *marked])


def _marked_words(text: str) -> list[tuple[str, str]] | None:
    """``[(word, mark), ...]`` of a response, or None when it is not of that shape."""
    parts = text.split()
    if not parts or parts[0] != LEAD:
        return None
    out = []
    for part in parts[1:]:
        word, mark = part[:-1], part[-1:]
        if mark not in (GOOD, BAD) or not word.isalpha():
            return None
        out.append((word, mark))
    return out


def is_well_formed(prompt: str, text: str) -> bool:
    """Whether ``text`` is ``"ok:"`` and the prompt's words in order, one mark each, no more."""
    got = _marked_words(text)
    return got is not None and [w for w, _ in got] == prompt_words(prompt)


def true_score(prompt: str, text: str) -> float:
    """The known preference: ``1 - |share of ! - TARGET_SHARE| / TARGET_SHARE`` if well-formed
    (1 at three ``!`` out of four, 0 at none, 2/3 at two or four), else -1."""
    if not is_well_formed(prompt, text):
        return MALFORMED_SCORE
    got = _marked_words(text)
    share = sum(m == GOOD for _, m in got) / len(got)
    return 1.0 - abs(share - TARGET_SHARE) / TARGET_SHARE


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"expo-demo/{seed}/{purpose}")


def _random_words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(MIN_WORDS, MAX_WORDS))


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct held-out prompts (never among :func:`train_prompts` for the same seed)."""
    rng = _rng(seed, "eval")
    out: dict[str, None] = {}
    while len(out) < n:
        out[prompt_text(_random_words(rng))] = None
    return list(out)


def train_prompts(n: int, seed: int = 0, *, purpose: str = "train") -> list[str]:
    """``n`` training prompts (repeats allowed), none of them among the held-out prompts."""
    held_out = set(eval_prompts(_HELD_OUT_POOL, seed))
    rng = _rng(seed, purpose)
    out = []
    while len(out) < n:
        p = prompt_text(_random_words(rng))
        if p not in held_out:
            out.append(p)
    return out


_HELD_OUT_POOL = 1000  # eval prompts are the first n of this pool, so any n <= 1000 is held out


def _random_forms(rng: random.Random, n: int, good: float = 0.5) -> list[bool]:
    return [rng.random() < good for _ in range(n)]


def _forms_with(rng: random.Random, n: int, good: int) -> list[bool]:
    """``n`` marks, ``good`` of them ``!`` at random places."""
    places = set(rng.sample(range(n), good))
    return [i in places for i in range(n)]


def sft_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs: well-formed, each mark ``!`` with probability
    ``SFT_GOOD_SHARE``."""
    rng = _rng(seed, "sft-forms")
    out = []
    for p in train_prompts(n, seed, purpose="sft"):
        words = prompt_words(p)
        out.append((p, response(words, _random_forms(rng, len(words), SFT_GOOD_SHARE))))
    return out


_MALFORMED_KINDS = ("wrong", "duplicate", "swap", "missing", "extra", "repeat", "ramble",
                    "double_mark", "no_mark", "no_lead", "shout", "gibberish", "empty")
_MALFORMED_WEIGHTS = (2, 2, 1, 1, 1, 1, 1, 2, 1, 0.5, 2, 1, 0.5)


def malformed_response(rng: random.Random, words: list[str]) -> str:
    """A response that breaks the format in one of several ways (marks mostly ``!``, so that
    the marks alone never tell a malformed response from a well-formed one)."""
    kind = rng.choices(_MALFORMED_KINDS, weights=_MALFORMED_WEIGHTS)[0]
    if kind == "gibberish":
        letters = "abcdefghijklmnopqrstuvwxyz:.,!?"
        return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
                        for _ in range(rng.randint(1, 12)))
    if kind == "empty":
        return ""
    out = list(words)
    if kind == "wrong":
        for i in rng.sample(range(len(out)), rng.randint(1, 2)):
            out[i] = rng.choice([w for w in WORDS if w not in words])
    elif kind == "duplicate":  # a prompt word said again in place of another one
        i, j = rng.sample(range(len(out)), 2)
        out[i] = out[j]
    elif kind == "swap":
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "missing":
        del out[rng.randrange(len(out))]
    elif kind == "extra":
        out += [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    elif kind == "repeat":
        out = out * rng.randint(2, 4)
    elif kind == "ramble":
        out = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
    marks = [GOOD if rng.random() < 0.7 else BAD for _ in out]
    if kind == "double_mark":
        i = rng.randrange(len(out))
        marks[i] = rng.choice(("!!", "!.", ".!", "..", "! !", ". ."))
    elif kind == "no_mark":
        for i in rng.sample(range(len(out)), rng.randint(1, len(out))):
            marks[i] = ""
    parts = ([] if kind == "no_lead" else [LEAD]) + [w + m for w, m in zip(out, marks)]
    if kind == "shout":  # a run of marks in place of the lead and the first words
        cut = rng.randint(1, len(parts) - 1)
        parts = [GOOD * rng.randint(1, 8)] + parts[cut:]
    return " ".join(parts)


@dataclass(frozen=True)
class Pair:
    """A preference: ``chosen`` beats ``rejected`` for ``prompt`` under :func:`true_score`."""

    prompt: str
    chosen: str
    rejected: str
    kind: str  # "form" (both well-formed, closer to three ``!`` wins) or "format" (malformed loses)


def preference_pairs(n: int, seed: int = 0, *, format_share: float = 0.25) -> list[Pair]:
    """``n`` preference pairs in random order; about ``format_share`` of them (kind "format") pit
    a well-formed response against a malformed one, the rest (kind "form") two well-formed
    responses with different scores, each with a number of ``!`` drawn uniformly from 0 to 4
    (so pairs that show "four ``!`` lose to three" are common enough to learn)."""
    rng = _rng(seed, "pairs")
    out = []
    for p in train_prompts(n, seed, purpose="pairs"):
        words = prompt_words(p)
        if rng.random() < format_share:
            good = response(words, _random_forms(rng, len(words)))
            out.append(Pair(p, good, malformed_response(rng, words), "format"))
            continue
        while True:
            a = response(words, _forms_with(rng, len(words), rng.randint(0, len(words))))
            b = response(words, _forms_with(rng, len(words), rng.randint(0, len(words))))
            if true_score(p, a) != true_score(p, b):
                break
        chosen, rejected = (a, b) if true_score(p, a) > true_score(p, b) else (b, a)
        out.append(Pair(p, chosen, rejected, "form"))
    return out


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text to train the tokenizer on: prompts and responses, so that every word (with its
    leading space) is a single token."""
    rng = _rng(seed, "corpus")
    lines = [prompt_text(_random_words(rng)) for _ in range(n)]
    for _ in range(n):
        words = _random_words(rng)
        lines.append(response(words, _random_forms(rng, len(words))))
    return lines
