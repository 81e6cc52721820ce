"""The search's ``evaluate(alpha, n)`` when the aligned model is a LoRA adapter: one multi-LoRA
engine on the SFT model for the whole search.

Each alpha the search asks for becomes an adapter written next to the engine (a scaled config,
megabytes; no storage writes) and added to it; each round's answers -- every alpha of the round --
are generated in one batch. The engine is never restarted or swapped (unless the cluster cannot
hold it and the reward engine at once: then they take turns, and the adapters are added again).
"""
from __future__ import annotations

import time

from ..errors import ExpoError
from ..options import format_alpha


class LoraEvaluator:
    """Like :class:`expo_ray.alpha_search.driver._Evaluator`, on a multi-LoRA engine."""

    def __init__(self, ray, sft: str, aligned: str, texts: list[str], reward_model: str, sampling, engines, plan,
                 time_share: bool):
        from ..checkpoint.identity import checkpoint_identity
        from ..evaluation.adapter_generation import serving_problem
        from ..evaluation.engine.multi_lora import adapter_rank
        from ..lora.adapter import open_adapter
        from ..lora.plan import adapter_identity

        problem = serving_problem(sft, [aligned])
        if problem:
            raise ExpoError(f"{aligned}: {problem}; expo-ray search serves adapters with multi-LoRA (run --merge "
                            "evaluates merged variants by weight swaps)")
        self.ray, self.sft, self.aligned, self.texts = ray, sft, aligned, texts
        self.sampling, self.plan = sampling.to_dict(), plan.to_dict()
        self.engines, self.reward_model, self.time_share = engines, reward_model, time_share
        self.rank = adapter_rank(open_adapter(aligned).config)
        remote = "://" in aligned and not aligned.startswith("file://")
        self.aligned_identity = adapter_identity(aligned) if remote else None
        self.sft_identity = checkpoint_identity(sft) if "://" in sft and not sft.startswith("file://") else None
        self.generator = self.scorer = None
        self.added: set[float] = set()
        self.answers: dict[float, list[dict]] = {}
        self.swap_seconds: list[float] = []   # seconds to write and add each alpha's adapter
        self.swap_record = None  # adapters are added, no weights are swapped: nothing to prove or check
        self.generate_seconds = 0.0
        if not time_share:
            self._generator(), self._scorer()

    @property
    def engine_starts(self) -> int:
        return self.engines.started

    def _generator(self):
        from ..evaluation.engine.lora_actor import start_multi_lora

        if self.generator is None:
            if self.scorer is not None and self.time_share:
                self.engines.stop(self.scorer)
                self.scorer = None
            self.generator = start_multi_lora(
                self.engines, self.sft, self.sft_identity, {}, max_rank=self.rank, slots=8, cached=16,
                label=f"{self.sft} with the adapters of {self.aligned}")
            self.added = set()
        return self.generator

    def _scorer(self):
        if self.scorer is None:
            if self.generator is not None and self.time_share:
                self.engines.stop(self.generator)
                self.generator = None
            self.scorer = self.engines.reward(self.reward_model)
        return self.scorer

    def _name(self, alpha: float) -> str:
        return f"alpha_{format_alpha(alpha)}"

    def _generate(self, requests: list[tuple[float, int]]) -> dict[float, list[dict]]:
        """One batch: the prompts each (alpha, n) still needs."""
        generator = self._generator()
        for alpha, _ in requests:
            if alpha not in self.added:
                info = self.ray.get(generator.add_alpha.remote(self._name(alpha), self.aligned, alpha, self.plan))
                self.swap_seconds.append(info["seconds"])
                self.added.add(alpha)
        jobs = {self._name(a): (self._name(a), self.texts[len(self.answers.get(a, [])):n]) for a, n in requests}
        began = time.perf_counter()
        out = self.ray.get(generator.generate_many.remote(jobs, self.sampling))
        self.generate_seconds += time.perf_counter() - began
        return {a: out[self._name(a)] for a, _ in requests}

    def _score(self, alpha: float, generations: list[dict]) -> None:
        done = self.answers.setdefault(alpha, [])
        new = self.texts[len(done):len(done) + len(generations)]
        rewards = self.ray.get(self._scorer().score.remote(new, [g["output"] for g in generations]))
        done.extend({**g, "reward": r} for g, r in zip(generations, rewards))

    def prefetch(self, requests: list[tuple[float, int]]) -> None:
        """A whole round in one batch, then scored."""
        wanted = [(a, n) for a, n in requests if len(self.answers.get(a, [])) < n]
        if not wanted:
            return
        for alpha, generations in self._generate(wanted).items():
            self._score(alpha, generations)

    def __call__(self, alpha: float, n: int) -> list[float]:
        if len(self.answers.get(alpha, [])) < n:
            self.prefetch([(alpha, n)])
        return [a["reward"] for a in self.answers[alpha]]

    def close(self) -> None:
        self.engines.close()
        self.generator = self.scorer = None
