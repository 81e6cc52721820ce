"""The embedded S3 server (SeaweedFS) that the demo and the tests start: it starts even when a port
it chose is taken before it binds it, and it never outlives the process that started it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from expo_ray.storage import embedded_s3

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("taken_call", [1, 3], ids=["s3-port", "another-port"])
def test_a_port_taken_between_choosing_and_binding_gets_a_fresh_start(monkeypatch, tmp_path, taken_call):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken, calls, choose = busy.getsockname()[1], [], embedded_s3.free_port

    def free_port():
        calls.append(1)
        return taken if len(calls) == taken_call else choose()

    monkeypatch.setattr(embedded_s3, "free_port", free_port)
    server = embedded_s3.EmbeddedS3(tmp_path / "s3")
    try:
        server.start()
        assert server.port != taken and server._answers()
        # The collision happened (for the S3 port the server stopped and was started again; for its
        # other ports SeaweedFS finds another one itself):
        assert f"port {taken} ".encode() in server.log_path.read_bytes()
    finally:
        server.close()
        busy.close()


def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    code = ("import sys, time\nfrom expo_ray.storage.embedded_s3 import EmbeddedS3\n"
            f"s = EmbeddedS3({str(tmp_path / 's3')!r}).start()\nprint(s.proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        weed = int(parent.stdout.readline())
        assert psutil.pid_exists(weed)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and psutil.pid_exists(weed) and psutil.Process(weed).status() != "zombie":
            time.sleep(0.2)
        assert not psutil.pid_exists(weed) or psutil.Process(weed).status() == "zombie", "weed outlived its parent"
    finally:
        parent.kill()
