"""Shared fixtures: one local Ray instance per test session, tiny checkpoint pairs built once, the
embedded S3 server; the `slow` marker for tests that need what is slow to start; a check that no
server or engine a test started outlives the session."""
from __future__ import annotations

import os
import sys
import time

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The embedded S3 server's credentials, in the environment before Ray starts so that its workers
# have them whenever the server is started (its endpoint reaches tasks through expo-ray's own
# forwarding of AWS_ENDPOINT_URL). Ray no longer waits for the server, nor the server for Ray.
os.environ.update({"AWS_ACCESS_KEY_ID": "expo-ray", "AWS_SECRET_ACCESS_KEY": "expo-ray-secret",
                   "AWS_DEFAULT_REGION": "us-east-1"})

# A test that uses one of these fixtures is slow (marked automatically); so is a module that
# starts vLLM engines, trains the demo's models or starts a `ray start` head (marked in the module).
SLOW_FIXTURES = {"s3_server", "s3_client", "autoscaling_cluster",
                 "engine", "gen_engine", "rm_engine", "ray_head"}  # vLLM engines, a `ray start` head


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _leftovers() -> list:
    """Processes started under this test session that are S3 servers or vLLM engines."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            text = " ".join([proc.name()] + proc.cmdline()).lower()
        except psutil.Error:
            continue
        if "weed" in text.split("/")[-1] or "weed mini" in text or "vllm" in text:
            found.append(proc)
    return found


def pytest_sessionfinish(session, exitstatus):
    """Every server and engine a test starts must be stopped by it (also when it fails): a
    leftover fails the session, and is killed."""
    import psutil

    deadline = time.monotonic() + 30  # engines may still be shutting down after their last test
    left = _leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p for p in _leftovers() if p.status() != psutil.STATUS_ZOMBIE]
    if not left:
        return
    names = ", ".join(f"{p.pid} ({' '.join(p.cmdline())[:80]})" for p in left)
    print(f"\nerror: {len(left)} process(es) started by the tests outlived them: {names}", file=sys.stderr)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    session.exitstatus = 1


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback, with the credentials set above; its
    endpoint goes into the environment (and from there to Ray tasks)."""
    from expo_ray.storage.embedded_s3 import EmbeddedS3

    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs"), access_key=os.environ["AWS_ACCESS_KEY_ID"],
                        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]).start()
    os.environ.update(server.env())
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")


@pytest.fixture(scope="session")
def ray_local():
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
