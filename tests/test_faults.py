"""Faults: a killed worker, a killed driver, an S3 outage, wrong credentials, a dead or frozen
endpoint. Each asserts that nothing is lost and nothing half-written is visible. Every wait is
bounded."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    cli_env,
    error_lines,
    frozen_endpoint,
    local_files,
    make_bucket,
    s3_files,
    shards_only,
    upload_folder,
    write_checkpoint,
)

from expo_ray.api import extrapolate
from expo_ray.errors import ExpoError
from expo_ray.publish.manifest import verify_variant
from expo_ray.storage import open_storage

EXPO = str(Path(sys.executable).with_name("expo-ray"))
ALPHAS = (0.2, 0.4)
CHUNK_MIB = 0.25
WAIT_S = 240


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """A synthetic Llama-shaped pair big enough for several chunks per shard (3 shards each)."""
    root = tmp_path_factory.mktemp("slowpair")
    g = torch.Generator().manual_seed(3)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3}
    sft = {f"model.layers.{i}.mlp.{p}.weight": (torch.randn(512, 256, generator=g) * 0.02).to(torch.bfloat16)
           for i in range(3) for p in ("up_proj", "down_proj")}
    aligned = {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(torch.bfloat16) for k, v in sft.items()}
    write_checkpoint(root / "sft", sft, cfg, 600_000)
    write_checkpoint(root / "aligned", aligned, cfg, 300_000)
    clean = root / "clean"
    extrapolate(str(root / "sft"), str(root / "aligned"), ALPHAS, str(clean), chunk_mib=CHUNK_MIB, show_progress=False)
    return root / "sft", root / "aligned", clean


def expected_shards(clean: Path) -> dict:
    return {a: shards_only(local_files(clean / f"alpha_{a}")) for a in ALPHAS}


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_running(prefix: str):
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith(prefix):
            return p
    return None


def test_worker_killed_mid_shard_is_retried(ray_local, slow_pair, tmp_path, monkeypatch):
    sft, aligned, clean = slow_pair
    monkeypatch.setenv("EXPO_RAY_CHUNK_DELAY_S", "0.2")
    out = tmp_path / "out"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(r=extrapolate(
        str(sft), str(aligned), ALPHAS, str(out), chunk_mib=CHUNK_MIB, show_progress=False)))
    thread.start()
    wait_for(lambda: worker_running("ray::extrapolate:") is not None, "a shard task to start")
    time.sleep(0.5)  # mid-shard: a few chunks written, more to come
    victim = worker_running("ray::extrapolate:")
    victim.send_signal(signal.SIGKILL)
    thread.join(WAIT_S)
    assert not thread.is_alive() and "r" in outcome
    for alpha, shards in expected_shards(clean).items():
        folder = out / f"alpha_{alpha}"
        assert shards_only(local_files(folder)) == shards
        assert verify_variant(open_storage(str(folder))).ok
        assert not [p for p in folder.iterdir() if p.name.startswith(".expo-partial-")]


def test_driver_killed_then_rerun_resumes(ray_local, s3_client, s3_server, slow_pair, tmp_path):
    sft, aligned, clean = slow_pair
    src_sft = upload_folder(s3_client, sft, "models", "slow/sft")
    src_aligned = upload_folder(s3_client, aligned, "models", "slow/aligned")
    make_bucket(s3_client, "faults")
    dest = "s3://faults/driver-killed"
    cmd = [EXPO, "extrapolate", "--sft", src_sft, "--aligned", src_aligned, "--alpha", ",".join(map(str, ALPHAS)),
           "--out", dest, "--chunk-mib", "1", "--no-progress"]
    env = dict(os.environ, EXPO_RAY_CHUNK_DELAY_S="0.3", RAY_ADDRESS="")
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def shard_finished():
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()
        return bool(s3_files(s3_client, "faults", "driver-killed/.expo-ray/receipts"))
    try:
        wait_for(shard_finished, "a finished shard")
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.wait(30)
    # Killed before any commit: nothing is visible as a finished variant.
    for alpha in ALPHAS:
        assert not verify_variant(open_storage(f"{dest}/alpha_{alpha}")).ok
    env.pop("EXPO_RAY_CHUNK_DELAY_S")
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed:" in rerun.stderr and "already written by an earlier run" in rerun.stderr
    for alpha, shards in expected_shards(clean).items():
        assert shards_only(s3_files(s3_client, "faults", f"driver-killed/alpha_{alpha}")) == shards
        assert verify_variant(open_storage(f"{dest}/alpha_{alpha}")).ok
    assert not s3_client.list_multipart_uploads(Bucket="faults").get("Uploads")


@pytest.mark.slow  # its own S3 server
def test_s3_outage_during_run(ray_local, slow_pair, tmp_path, monkeypatch):
    """The S3 server is killed mid-run and restarted: retries carry the run through, or it fails
    with a clear message and a re-run completes."""
    import boto3

    from expo_ray.storage.embedded_s3 import EmbeddedS3

    sft, aligned, clean = slow_pair
    server = EmbeddedS3(tmp_path / "weed").start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3", endpoint_url=server.endpoint)
        make_bucket(client, "outage")
        monkeypatch.setenv("EXPO_RAY_CHUNK_DELAY_S", "0.2")
        outcome = {}

        def run():
            try:
                outcome["result"] = extrapolate(str(sft), str(aligned), ALPHAS, "s3://outage/run", chunk_mib=CHUNK_MIB,
                                                show_progress=False)
            except ExpoError as exc:
                outcome["error"] = str(exc)

        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: bool(s3_files(client, "outage", "run/.expo-ray/receipts")), "a finished shard")
        server.stop()
        time.sleep(3)
        server.start(port=server.port)
        thread.join(WAIT_S)
        assert not thread.is_alive()
        if "error" in outcome:
            assert "s3://outage/run" in outcome["error"], outcome["error"]
            monkeypatch.delenv("EXPO_RAY_CHUNK_DELAY_S")
            extrapolate(str(sft), str(aligned), ALPHAS, "s3://outage/run", chunk_mib=CHUNK_MIB, show_progress=False)
        for alpha, shards in expected_shards(clean).items():
            assert shards_only(s3_files(client, "outage", f"run/alpha_{alpha}")) == shards
            assert verify_variant(open_storage(f"s3://outage/run/alpha_{alpha}")).ok
    finally:
        server.close()


def test_wrong_credentials_and_dead_endpoint(s3_server, s3_client, bf16_pair, tmp_path):
    src = upload_folder(s3_client, bf16_pair[1], "models", "creds/aligned")
    make_bucket(s3_client, "creds-out")
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="definitely-wrong", RAY_ADDRESS="")
    run = subprocess.run([EXPO, "extrapolate", "--sft", str(bf16_pair[0]), "--aligned", src, "--alpha", "0.3",
                          "--out", "s3://creds-out/x"], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 1 and "credentials were rejected" in run.stderr, run.stderr
    assert "definitely-wrong" not in run.stderr + run.stdout
    assert not s3_files(s3_client, "creds-out", "x")
    assert not s3_client.list_multipart_uploads(Bucket="creds-out").get("Uploads")

    from expo_ray.storage.embedded_s3 import free_port

    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", EXPO_RAY_S3_ATTEMPTS="2", RAY_ADDRESS="")
    run = subprocess.run([EXPO, "inspect", src], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 1 and "cannot reach the S3 endpoint" in run.stderr, run.stderr


@pytest.mark.parametrize("how", ["--s3-timeout 8 after the command", "EXPO_RAY_S3_TIMEOUT=8"])
def test_a_frozen_s3_endpoint_is_reported_within_the_timeout(how):
    """An endpoint that accepts connections and never answers: one line within the limit (default
    120 s, each request waiting a quarter of it), not botocore's and expo-ray's retries multiplied."""
    with frozen_endpoint() as url:
        env = cli_env(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
                      AWS_DEFAULT_REGION="us-east-1")
        args = [EXPO, "inspect", "s3://frozen/model"]
        if how.startswith("--"):
            args += ["--s3-timeout", "8"]
        else:
            env["EXPO_RAY_S3_TIMEOUT"] = "8"
        began = time.monotonic()
        run = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        took = time.monotonic() - began
    assert run.returncode == 1 and error_lines(run.stdout + run.stderr) == [
        "error: s3://frozen/model: S3 did not answer within the 8-second limit (ReadTimeoutError); for a slow "
        "endpoint raise --s3-timeout (or EXPO_RAY_S3_TIMEOUT)"], run.stderr
    assert took < 8 + 15, took  # the limit, plus starting Python


def test_s3_requests_wait_a_quarter_of_the_timeout(monkeypatch):
    from expo_ray.storage import s3

    monkeypatch.delenv("EXPO_RAY_S3_TIMEOUT", raising=False)
    assert s3.timeout_s() == 120
    config = s3.client().meta.config
    assert (config.read_timeout, config.connect_timeout, config.retries["total_max_attempts"]) == (30, 10, 1)
    monkeypatch.setenv("EXPO_RAY_S3_TIMEOUT", "nope")
    with pytest.raises(ExpoError, match="EXPO_RAY_S3_TIMEOUT='nope': the S3 timeout must be a positive number"):
        s3.timeout_s()


def test_the_fault_table_names_real_tests():
    """docs/faults.md: every row names tests, and every test it names exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    lines = (root / "docs" / "faults.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| fault |")) + 2
    rows = []
    for line in lines[start:]:  # the fault table: up to the first line that is not a row
        if not line.startswith("| "):
            break
        rows.append(line)
    assert len(rows) >= 20
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        named, module = [], None
        for ref in re.findall(r"`(test_\w+\.py(?:::test_\w+)?|test_\w+)`", cell):
            if ".py" in ref:
                module, _, ref = ref.partition("::")
            if ref:
                named.append((module, ref))
        assert named or re.search(r"`test_\w+\.py`", cell), row
        for module, name in named:
            assert re.search(rf"^def {name}\(", (root / "tests" / module).read_text(), re.M), (module, name)
