"""Ray, and what a cluster can hold: shared by extrapolation and evaluation.

:mod:`.ray_runtime` connects to (or starts) Ray, forwards the credentials' environment to workers
and shows progress; :mod:`.capacity` judges what the cluster can ever hold (autoscaler node types
included), so that a request no node could take fails at once instead of waiting forever (shard
tasks, and the vLLM engines sized by :mod:`expo_ray.evaluation.engine.placement`). It imports
only errors.
"""
