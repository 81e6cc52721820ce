"""expo-ray: ExPO weight extrapolation (theta = aligned + alpha * (aligned - sft)) on Ray.

The Python API (for notebooks and scripts) runs the same steps as the `expo-ray` command:

    import expo_ray
    expo_ray.extrapolate(sft, aligned, [0.1, 0.3, 0.5], out)      # one variant folder per alpha
    prompts = expo_ray.load_prompts("alpaca_eval", limit=100)
    report = expo_ray.evaluate(out, prompts, reward_model)         # report["best"]["alpha"]
    report = expo_ray.search(sft, aligned, prompts, reward_model, out=out2)

Their arguments are documented in expo_ray.api (load_prompts: expo_ray.evaluate.prompts).
`expo_ray.extrapolate`, `expo_ray.evaluate` and `expo_ray.search` are also the modules of those
names: calling them runs the API function. Importing the package stays cheap; each call imports what it needs.
"""
import importlib
import types

__version__ = "0.1.0"


class CallableModule(types.ModuleType):
    """A module that, called, runs the expo_ray.api function of its own name."""

    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def load_prompts(spec, **options):
    """A prompt set: "ultrafeedback", "alpaca_eval" or a file (see expo_ray.evaluate.prompts.load_prompts)."""
    from .evaluate.prompts import load_prompts as load

    return load(spec, **options)


def __getattr__(name):
    if name in ("extrapolate", "evaluate", "search"):  # first use, before anything imported the module
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "extrapolate", "evaluate", "search", "load_prompts"]
