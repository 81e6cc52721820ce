"""`ray job submit` end to end: a real `ray start --head` on loopback, the job writes to S3."""
import json
import re
import subprocess

import pytest
from helpers import make_bucket, upload_folder
from ray_head import BIN, RayHead

from expo_ray.publish.manifest import verify_variant
from expo_ray.storage import open_storage

TIMEOUT_S = 420


@pytest.fixture(scope="module")
def ray_head():
    with RayHead() as head:
        yield head


def test_ray_job_submit_to_s3(ray_head, s3_server, s3_client, bf16_pair):
    sft = upload_folder(s3_client, bf16_pair[0], "models", "job/sft")
    aligned = upload_folder(s3_client, bf16_pair[1], "models", "job/aligned")
    make_bucket(s3_client, "job-out")
    # Storage settings travel with the job, as they would on a cluster (credentials there come
    # from the nodes' own AWS chain; here the head inherited them from this environment).
    runtime_env = {"env_vars": {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}}
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_head.address,
              "--runtime-env-json", json.dumps(runtime_env), "--",
              "expo-ray", "extrapolate", "--sft", sft, "--aligned", aligned, "--alpha", "0.1,0.3",
              "--out", "s3://job-out/tiny", "--no-progress"]
    run = subprocess.run(submit, env=ray_head.env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", run.stdout + run.stderr).group(0)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", ray_head.address, job_id],
                            env=ray_head.env(), capture_output=True, text=True, timeout=120)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    for alpha in ("0.1", "0.3"):
        assert verify_variant(open_storage(f"s3://job-out/tiny/alpha_{alpha}")).ok
    check = subprocess.run([str(BIN / "expo-ray"), "verify", "s3://job-out/tiny"], capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0 and check.stdout.count("ok ") == 2, check.stdout + check.stderr
