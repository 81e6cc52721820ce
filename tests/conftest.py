"""Shared fixtures: one local Ray instance per test session, tiny checkpoint pairs built once."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (started once; ray.init takes seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pair_factory(tmp_path_factory):
    """Builds (and caches per argument set) a tiny SFT/aligned pair sharded differently."""
    from expo_ray.demo.tiny import build_tiny_pair

    cache = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp("pair")
            cache[key] = build_tiny_pair(root, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def bf16_pair(pair_factory):
    return pair_factory(dtype="bfloat16")
