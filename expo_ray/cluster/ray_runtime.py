"""Connecting to Ray (a cluster address, or a local instance) and progress across tasks."""
from __future__ import annotations

import logging
import os
import socket
import sys
import time

from ..errors import ExpoError

log = logging.getLogger("expo_ray")


# Settings (never secrets) that tasks need to see the same storage as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT")


def forwarded_env() -> dict:
    """Storage settings and EXPO_RAY_* tuning of the driver, passed to tasks as runtime_env."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.update({k: v for k, v in os.environ.items() if k.startswith("EXPO_RAY_")})
    return env


_worker_env: dict | None = None  # the forwarded settings workers were started with, if known


def note_worker_env() -> None:
    """Record that Ray's workers inherit this process's current environment (a local instance
    started here, or a job whose runtime_env already carries it)."""
    global _worker_env
    _worker_env = forwarded_env()


def task_options(**options) -> dict:
    """Ray task options, plus a runtime_env carrying the driver's storage settings when workers
    may not have them (a runtime_env of its own makes Ray start fresh workers: avoid needlessly)."""
    env = forwarded_env()
    if env and env != _worker_env:
        options["runtime_env"] = {"env_vars": env}
    return options


CONNECT_TIMEOUT_S = 5


def check_reachable(address: str) -> None:
    """Fail within seconds when nothing answers at a cluster address (Ray itself keeps retrying
    for minutes)."""
    if address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.split("/")[0].rpartition(":")
    if not host:
        host, port = port, ""
    default = {"ray": 10001, "http": 80, "https": 443}.get(scheme, 6379)
    try:
        socket.create_connection((host.strip("[]"), int(port) if port.isdigit() else default),
                                 timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ExpoError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc or 'timed out'} "
                        "(is the address right and the head node up?)") from None


def ensure_ray(address: str | None = None):
    """Return the ray module, connected: to `address`, RAY_ADDRESS, or a new local instance."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    began = time.perf_counter()
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:  # always a new instance, never one a `ray start` on this machine left running
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as exc:
        raise ExpoError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    if not address or os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        note_worker_env()  # local workers inherit our env; a submitted job's tasks inherit its runtime_env
    log.info("Ray %s in %.1f s", "connected" if address else "started locally", time.perf_counter() - began)
    return ray


def _tracker_class(ray):
    @ray.remote(num_cpus=0)
    class ProgressTracker:
        """Counts bytes done across tasks; the driver polls it to draw one progress bar."""

        def __init__(self):
            self.done = 0

        def add(self, n: int) -> None:
            self.done += n

        def get(self) -> int:
            return self.done

    return ProgressTracker


class ProgressBar:
    """A tqdm bar in the driver fed by a tracker actor the tasks report to."""

    def __init__(self, ray, total: int, label: str, enabled: bool = True):
        self.ray, self.total, self.label, self.enabled = ray, total, label, enabled
        self.tracker = None
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm

            self.tracker = _tracker_class(self.ray).remote()
            self.bar = tqdm(total=self.total, desc=self.label, unit="B", unit_scale=True,
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        return self

    def wait(self, refs: dict, describe=None) -> list:
        """Wait for all task refs, updating the bar; re-raises the first task error (one line:
        `describe(refs[ref])` names what the task was working on)."""
        ray = self.ray
        pending = list(refs)
        results = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            try:
                for ref in ready:
                    results[ref] = _get(ray, ref, describe(refs[ref]) if describe else "a Ray task")
            except Exception:
                # The first failure is reported; the other tasks are stopped, and their errors
                # (often the same one) are not dumped on the console as well.
                os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
            if self.bar is not None:
                self.bar.n = min(self.total, ray.get(self.tracker.get.remote()))
                self.bar.refresh()
        if self.bar is not None:
            self.bar.n = self.total
            self.bar.refresh()
        return [results[r] for r in refs]

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.ray.kill(self.tracker)


def _get(ray, ref, what: str = "a Ray task"):
    """ray.get, turning what a task met into one line for the user: its ExpoError as it was, an
    OSError or MemoryError (disk full, I/O error, ...) named with the file it was working on
    (`what`), a worker that died after its retries likewise. Other errors are bugs: raised as is."""
    from ray import exceptions

    try:
        return ray.get(ref)
    except exceptions.RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc.as_instanceof_cause()
        if isinstance(cause, ExpoError):
            raise cause.with_traceback(None) from None
        if isinstance(cause, OSError):
            where = cause.filename or what
            raise ExpoError(f"{where}: {cause.strerror or cause}") from None
        if isinstance(cause, MemoryError):
            raise ExpoError(f"{what}: out of memory in a Ray task (lower --chunk-mib)") from None
        raise
    except (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError, exceptions.NodeDiedError) as exc:
        reason = "out of memory (Ray's memory monitor killed it)" if isinstance(exc, exceptions.OutOfMemoryError) \
            else "its worker or node died"
        raise ExpoError(f"{what}: the Ray task failed after its retries: {reason}; see the Ray logs") from None
