"""expo-ray: ExPO weight extrapolation (theta = aligned + alpha * (aligned - sft)) on Ray.

The Python API (for notebooks and scripts) runs the same steps as the `expo-ray` command:

    import expo_ray
    expo_ray.extrapolate(sft, aligned, [0.1, 0.3, 0.5], out)      # one variant folder per alpha
    prompts = expo_ray.load_prompts("alpaca_eval", limit=100)
    report = expo_ray.evaluate(out, prompts, reward_model)         # report["best"]["alpha"]
    report = expo_ray.search(sft, aligned, prompts, reward_model, out=out2)

These are plain functions; their arguments are documented in :mod:`expo_ray.api`. Importing the
package stays cheap: each call imports what it needs. The packages, one per stage of the pipeline,
are described in docs/ARCHITECTURE.md.
"""
from ._version import __version__


def extrapolate(sft, aligned, alphas, out, **options):
    """One committed variant folder per alpha under ``out`` (see :func:`expo_ray.api.extrapolate`)."""
    from . import api

    return api.extrapolate(sft, aligned, alphas, out, **options)


def evaluate(variants, prompts, reward_model, **options):
    """Generate, score and report every variant under ``variants`` (see :func:`expo_ray.api.evaluate`)."""
    from . import api

    return api.evaluate(variants, prompts, reward_model, **options)


def search(sft, aligned, prompts, reward_model, **options):
    """Adaptive alpha search on one engine (see :func:`expo_ray.api.search`)."""
    from . import api

    return api.search(sft, aligned, prompts, reward_model, **options)


def load_prompts(spec, **options):
    """A prompt set: "ultrafeedback", "alpaca_eval" or a file (see :func:`expo_ray.evaluation.prompts.load_prompts`)."""
    from .evaluation.prompts import load_prompts as load

    return load(spec, **options)


__all__ = ["__version__", "extrapolate", "evaluate", "search", "load_prompts"]
