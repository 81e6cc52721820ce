"""A real Ray head (`ray start --head`) on loopback for `ray job submit` tests.

Every port is chosen free and the head gets its own temp dir, so it never collides with the
test session's local Ray; it is stopped by killing exactly its own processes (`ray stop` would
stop every Ray instance on the machine).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from expo_ray.storage.embedded_s3 import free_port

BIN = Path(sys.executable).parent


def _worker_ports_below_ephemeral() -> int:
    """The first of 100 worker ports, below the kernel's ephemeral range: the other ports come
    from free_port() (ephemeral), so the two can never overlap (they did: a node-manager port
    inside the worker range made `ray start` fail)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    span = max(ephemeral_low - 10000, 100) // 100
    return 10000 + (os.getpid() % span) * 100


class RayHead:
    def __init__(self, num_cpus: int = 2, extra_args: tuple = (), extra_env: dict | None = None):
        self.num_cpus = num_cpus
        self.extra_args, self.extra_env = tuple(extra_args), dict(extra_env or {})
        self.temp_dir = tempfile.mkdtemp(prefix="xr-", dir="/tmp")  # short: unix socket paths are limited
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Ray 2.60 turns token authentication on: give this cluster its own token.
        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(os.urandom(32).hex())

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        # Jobs run the `python`/`expo-ray` on the PATH of `ray start`: the project's venv.
        return dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_ADDRESS="",
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))

    def start(self, tries: int = 3) -> "RayHead":
        for attempt in range(tries):
            run = self._start_once()
            if run.returncode == 0:
                return self
            self.stop()
            # Another process may take a chosen port between choosing and binding: choose again.
            if "port" not in run.stderr.lower() or attempt == tries - 1:
                raise RuntimeError(f"ray start failed:\n{run.stdout}\n{run.stderr}")
            self.temp_dir = tempfile.mkdtemp(prefix="xr-", dir="/tmp")
            self.token_path = Path(self.temp_dir) / "auth_token"
            self.token_path.write_text(os.urandom(32).hex())
            self.gcs_port, self.dashboard_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> subprocess.CompletedProcess:
        lo = _worker_ports_below_ephemeral()
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
               f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--disable-usage-stats", *self.extra_args]
        return subprocess.run(cmd, env={**self.env(), **self.extra_env}, capture_output=True, text=True, timeout=180)

    def processes(self) -> list[psutil.Process]:
        own = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp_dir in part or f"{self.gcs_port}" == part.rpartition(":")[2]
                       for part in p.info["cmdline"] or []):
                    own.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return own

    def stop(self) -> None:
        procs = self.processes()
        for p in list(procs):
            try:
                procs.extend(p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
