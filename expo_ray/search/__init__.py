"""Adaptive alpha search: :mod:`.adaptive` (the schedule, engine-free) and :mod:`.driver` (one
swapping generation engine and one reward engine on Ray, the report, the winner materialized).

Called, ``expo_ray.search(sft, aligned, prompts, reward_model, ...)`` runs :func:`expo_ray.api.search`.
"""
import sys

from .. import CallableModule

sys.modules[__name__].__class__ = CallableModule
