"""Shared fixtures: one local Ray instance per test session, tiny checkpoint pairs built once."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback; its settings are in the environment
    before Ray starts, so workers use it too."""
    from expo_ray.storage.embedded_s3 import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    os.environ.update(server.env())
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray instance (started once; ray.init takes seconds)."""
    import ray

    if not ray.is_initialized():
        from expo_ray.cluster.ray_runtime import note_worker_env

        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        note_worker_env()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pair_factory(tmp_path_factory):
    """Builds (and caches per argument set) a tiny SFT/aligned pair sharded differently."""
    from helpers import build_pair

    cache = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            root = tmp_path_factory.mktemp("pair")
            cache[key] = build_pair(root, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def bf16_pair(pair_factory):
    return pair_factory(dtype="bfloat16")


# The simulated autoscaling cluster: a head that takes no work, two CPU workers for shard tasks and
# 2-GPU workers (fake GPUs) that exist only while something asks for GPUs. (The simulated nodes
# cannot declare `memory`, so the autoscaler would not start CPU nodes for shard tasks, which ask
# for memory: they are kept live with min_workers.)
CLUSTER_NODE_TYPES = {
    "cpu": {"resources": {"CPU": 1}, "min_workers": 2, "max_workers": 2},
    "gpu": {"resources": {"CPU": 2, "GPU": 2}, "min_workers": 0, "max_workers": 1},
}


@pytest.fixture(scope="session")
def autoscaling_cluster():
    """One simulated multi-node autoscaling cluster (Ray's own autoscaler) for the session."""
    from autoscaling_cluster import AutoscalingCluster

    cluster = AutoscalingCluster.started(CLUSTER_NODE_TYPES)
    yield cluster
    cluster.stop()
