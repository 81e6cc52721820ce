"""Does an adapter fit the SFT model? Every base tensor it changes must exist there, float, with
the shape the adapter needs; checked from headers before anything is written.

A mismatch is reported in one line that names the model the adapter says it was made for
(``base_model_name_or_path``), the first problem and how many more there are.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint.folder import Checkpoint, TensorLocation
from ..checkpoint.safetensors_io import FLOAT_DTYPES
from ..errors import PlanError
from .adapter import Adapter, LowRank, Whole


@dataclass(frozen=True)
class Target:
    """A LoRA module and the SFT tensor it changes; ``transposed``: the base stores (in, out)."""

    lora: LowRank
    sft: TensorLocation
    transposed: bool
    sft_bias: TensorLocation | None = None   # the base's bias, when the module has a LoRA bias


@dataclass(frozen=True)
class Replacement:
    """A whole tensor of the adapter and the SFT tensor it replaces."""

    whole: Whole
    sft: TensorLocation


@dataclass(frozen=True)
class Fit:
    targets: tuple[Target, ...]
    replacements: tuple[Replacement, ...]

    def changed(self) -> set[str]:
        """Names of the SFT tensors the adapter changes."""
        return ({t.sft.info.name for t in self.targets} | {t.sft_bias.info.name for t in self.targets if t.sft_bias}
                | {r.sft.info.name for r in self.replacements})


def _target(m: LowRank, sft: Checkpoint, fan_in_fan_out: bool) -> tuple[Target | None, str | None]:
    loc = sft.tensors.get(m.base)
    if loc is None:
        return None, f"module {m.module}: the SFT model has no tensor {m.base}"
    info = loc.info
    if info.dtype not in FLOAT_DTYPES:
        return None, f"module {m.module}: {m.base} is {info.dtype} in the SFT model, not a float tensor"
    out_dim, in_dim = m.b.shape[0], m.a.shape[1]
    transposed = m.embedding or fan_in_fan_out
    want = (in_dim, out_dim) if transposed else (out_dim, in_dim)
    if tuple(info.shape) != want:
        return None, (f"module {m.module}: the adapter needs {m.base} of shape {list(want)}, the SFT model's is "
                      f"{list(info.shape)}")
    bias = None
    if m.bias is not None:
        bias = sft.tensors.get(f"{m.module}.bias")
        if bias is None or tuple(bias.info.shape) != (out_dim,) or bias.info.dtype not in FLOAT_DTYPES:
            return None, f"module {m.module}: has a LoRA bias but the SFT model has no float {m.module}.bias of " \
                         f"shape [{out_dim}]"
    return Target(m, loc, transposed, bias), None


def _replacement(w: Whole, sft: Checkpoint) -> tuple[Replacement | None, str | None]:
    loc = sft.tensors.get(w.base)
    if loc is None:
        return None, f"tensor {w.info.name} ({w.why}): the SFT model has no tensor {w.base}"
    if tuple(loc.info.shape) != tuple(w.info.shape):
        return None, (f"tensor {w.info.name} ({w.why}): shape {list(w.info.shape)}, the SFT model's {w.base} is "
                      f"{list(loc.info.shape)}")
    if loc.info.dtype not in FLOAT_DTYPES:
        return None, f"tensor {w.info.name} ({w.why}): {w.base} is {loc.info.dtype} in the SFT model, not a float"
    return Replacement(w, loc), None


def fit_adapter(adapter: Adapter, sft: Checkpoint) -> Fit:
    """The adapter's modules paired with the SFT tensors they change; PlanError in one line if any
    does not fit."""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    targets, replacements, problems = [], [], []
    for m in adapter.modules:
        target, problem = _target(m, sft, fan_in_fan_out)
        problems.append(problem) if problem else targets.append(target)
    for w in adapter.whole:
        replacement, problem = _replacement(w, sft)
        problems.append(problem) if problem else replacements.append(replacement)
    if problems:
        made_for = f" (it was made for {adapter.base_model})" if adapter.base_model else ""
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise PlanError(f"{adapter.describe()}: this adapter does not fit the SFT model {sft.uri}{made_for}: "
                        f"{problems[0]}{more}")
    return Fit(tuple(targets), tuple(replacements))


def base_name_differs(adapter: Adapter, sft_uri: str) -> bool:
    """Whether the adapter names a Hub base model other than the SFT model's Hub repository (the
    shapes fit, so this is only worth a warning: a local copy has another name)."""
    base = adapter.base_model
    if not base or not sft_uri.startswith("hf://") or "/" not in base or base.startswith(("/", ".")):
        return False
    repo = sft_uri[len("hf://"):].split("@", 1)[0].rstrip("/")
    return base.rstrip("/") != repo
