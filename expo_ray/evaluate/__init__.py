"""Evaluation: prompt sets -> vLLM generation -> reward scoring -> aggregation per alpha -> report.

Called, ``expo_ray.evaluate(variants, prompts, reward_model, ...)`` runs :func:`expo_ray.api.evaluate`.
"""
import sys

from .. import CallableModule

sys.modules[__name__].__class__ = CallableModule
