"""Extrapolation: what to compute, and computing it.

:mod:`.plan` pairs the two checkpoints' tensors by name from their headers and validates them
(pure data, no tensor I/O); :mod:`.kernel` (C, with an exact NumPy fallback) and
:mod:`.kernel_torch` compute theta(alpha) correctly rounded; :mod:`.theta` gives theta(alpha)
tensor by tensor (for a running engine's weight swap); :mod:`.finite` checks for NaN/Inf;
:mod:`.shard_task` and :mod:`.pieces` are the Ray tasks that stream one output shard (or a byte
range of it) for every alpha at once; :mod:`.lineage` checks that the pair is parent and child.
It imports checkpoint, storage, cluster, options and errors; the commit of what the tasks
wrote belongs to :mod:`expo_ray.publish`.
"""
