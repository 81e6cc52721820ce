#!/usr/bin/env python
"""Benchmark: expo-ray's extrapolation against the ExPO paper's script, mergekit and a plain copy.

Run by hand (not a test); prints a markdown table. For each model size it writes a synthetic
Llama-shaped bf16 pair (``benchmarks/synthetic_pair.py``: SFT and aligned sharded differently)
to a scratch folder, then produces the variants for all alphas with each method:

* ``expo-ray``: ``expo_ray.api.extrapolate(sft, aligned, alphas, out, **options)`` once for all
  alphas, after ``ray.init(num_cpus=2)``; Ray start-up is timed and reported on its own row.
* ``expo-ray-sha256``: the same with ``sha256=True``: every file also gets its whole-file sha256,
  so each shard is one task writing its outputs in order (how expo-ray worked before byte-range
  pieces and BLAKE3 tree hashes).
* ``paper``: the ExPO paper's reference script (chujiezheng/LLM-Extrapolation,
  ``code/extrapolate.py``): both models loaded whole with transformers in bf16,
  ``aligned + alpha * (aligned - sft)`` per parameter in bf16, ``save_pretrained``; one process
  per alpha.
* ``mergekit``: ``mergekit-yaml`` from PyPI (mergekit 0.1.5, installed by this script into
  ``benchmarks/.venv-mergekit``), the equivalent ``linear`` merge (aligned weight 1 + alpha, sft
  weight -alpha, normalize false, dtype bfloat16), CPU, one run per alpha.
* ``copy``: the I/O floor: plain Python file I/O reads both models once and writes
  len(alphas) copies of the aligned model (same bytes in and out as an extrapolation), with an
  fsync per file (the durability expo-ray gives every output file).

Methods run in interleaved rounds (``--rounds``, default 3: every method once per round, the
page cache dropped before each) and the table gives the median and the minimum over rounds: this
disk's write speed changes by 2x between minutes, so a single run of each says little.
Every method runs in child processes. Wall time includes a final ``sync()`` (the data is on the
disk). Peak RSS is the largest single process's peak resident set (kernel ``VmHWM`` polled every
0.1 s over the method's whole process tree, which for expo-ray includes the Ray head processes
and the ``ray::`` workers, plus ``wait4``'s ``ru_maxrss`` for the direct child). RSS counts
file pages a process has mapped (mmap'ed safetensors); the "anon" column is the peak of
anonymous memory alone (sampled). The page cache is dropped before every method when possible
(root). The "mismatch" column compares one tensor of every output variant with the correctly
rounded result (float64 arithmetic, rounded once to bf16).

Usage:
    .venv/bin/python benchmarks/extrapolate_bench.py --sizes 1,2
    .venv/bin/python benchmarks/extrapolate_bench.py --sizes 2 --methods expo-ray,copy --rounds 5
    .venv/bin/python benchmarks/extrapolate_bench.py --sizes 0.2 --methods paper,mergekit,copy
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GB = 10**9
GIB = 2**30
METHODS = ("expo-ray", "expo-ray-sha256", "paper", "mergekit", "copy")
DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)
MERGEKIT_VERSION = "0.1.5"
TORCH_SPEC = "torch==2.13.0"  # installed first so pip takes the local CPU wheel, not a CUDA build
CHECK_TENSOR = "model.layers.0.self_attn.k_proj.weight"
EXIT_NO_API = 3


# ---------------------------------------------------------------------------------------------
# Measuring: wall time and the peak RSS of the largest process in a process tree
# ---------------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int] | None:
    """VmHWM, VmRSS, RssAnon of a process, in bytes (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _proc_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _proc_start(pid: int) -> str | None:
    """Start time in clock ticks (tells a process from a later one that reused its pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def _proc_label(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = [c.decode(errors="replace") for c in f.read().split(b"\0") if c]
    except OSError:
        return "?"
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0][:40]
    name = Path(cmd[0]).name
    if "_worker" in cmd:
        i = cmd.index("_worker")
        return f"{name} (bench worker {cmd[i + 1] if i + 1 < len(cmd) else ''})"
    for arg in cmd[1:3]:
        if arg.endswith(".py") or Path(arg).name.startswith("mergekit"):
            return f"{name} {Path(arg).name}"
    return name


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _proc_ppid(int(entry))
            if ppid is not None:
                kids.setdefault(ppid, []).append(int(entry))
    return kids


class PeakMonitor(threading.Thread):
    """Polls a process tree every ``interval`` s; keeps per-process peak RSS (VmHWM) and anon RSS.

    Reads /proc directly (psutil is only vendored inside Ray, not installed). Ray's head processes
    (gcs_server, raylet, dashboard) and its workers (``ray::...``) are descendants of the driver
    that called ``ray.init()``, so they are in the tree; processes that get re-parented after
    being seen stay tracked. Ray processes of other sessions on the same machine are deliberately
    not counted.
    """

    def __init__(self, root_pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.known: dict[int, str | None] = {}  # pid -> start time
        self.peak_rss: dict[int, int] = {}
        self.peak_anon: dict[int, int] = {}
        self.labels: dict[int, str] = {}

    def _sample(self) -> None:
        kids = _children_map()
        stack = [self.root_pid] + [p for p in self.known if p != self.root_pid]
        seen = set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            start = _proc_start(pid)
            if start is None:
                continue
            if self.known.setdefault(pid, start) != start:
                continue  # pid reused by an unrelated process
            stack.extend(kids.get(pid, ()))
        for pid in seen:
            if pid not in self.known:
                continue
            st = _proc_status(pid)
            if st is None:
                continue
            # Refreshed while alive: Ray workers rename themselves (ray::IDLE, ray::task).
            old, label = self.labels.get(pid), _proc_label(pid)
            if label != "?" and not (label == "ray::IDLE" and (old or "").startswith("ray::")):
                self.labels[pid] = label
            rss = max(st.get("VmHWM", 0), st.get("VmRSS", 0))
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)
            self.peak_anon[pid] = max(self.peak_anon.get(pid, 0), st.get("RssAnon", 0))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


@dataclass
class ProcResult:
    wall: float
    rc: int
    peak_rss: int
    peak_anon: int
    peak_label: str


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str]) -> ProcResult:
    """Run ``cmd``; wall time until exit and the largest single-process peak RSS of its tree."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        mon = PeakMonitor(proc.pid)
        mon.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        mon.stop()
    # Not wait4()'s ru_maxrss: on Linux a child's ru_maxrss starts from the parent's RSS at fork
    # (exec keeps the old mm's high-water mark), so it would report this driver's size.
    peaks = mon.peak_rss or {proc.pid: 0}
    top = max(peaks, key=peaks.get)
    return ProcResult(wall, rc, peaks[top], max(mon.peak_anon.values(), default=0),
                      mon.labels.get(top, "?"))


def sync_disk() -> float:
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def drop_caches() -> tuple[bool, str]:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True, "dropped"
    except OSError as exc:
        return False, f"not dropped ({exc.strerror or exc})"


# ---------------------------------------------------------------------------------------------
# Workers (run as child processes: `extrapolate_bench.py _worker KIND ...`)
# ---------------------------------------------------------------------------------------------


def run_expo_ray(sft: str, aligned: str, alphas: list[float], out: str, options: dict) -> None:
    """The one call that is timed for expo-ray (Ray is already initialised)."""
    from expo_ray.api import extrapolate

    extrapolate(sft, aligned, alphas, out, **options)


def worker_expo_ray(a: argparse.Namespace) -> int:
    try:
        import expo_ray.api  # noqa: F401 - fail before starting Ray if the API is not there yet
    except ImportError as exc:
        print(f"expo_ray.api not available: {exc}", file=sys.stderr)
        return EXIT_NO_API
    import ray

    t0 = time.perf_counter()
    for attempt in range(3):  # on a loaded machine the raylet can miss its start-up deadline
        try:
            ray.init(num_cpus=2)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == 2:
                raise
            print(f"ray.init failed ({exc}); retrying", file=sys.stderr)
            ray.shutdown()
            time.sleep(5)
    t1 = time.perf_counter()
    run_expo_ray(a.sft, a.aligned, a.alphas, a.out, json.loads(a.options))
    os.sync()
    t2 = time.perf_counter()
    ray.shutdown()
    Path(a.result).write_text(json.dumps({"ray_start_s": t1 - t0, "extrapolate_s": t2 - t1}))
    return 0


def worker_paper(a: argparse.Namespace) -> int:
    """The ExPO paper's code/extrapolate.py, minus device_map='auto' and trust_remote_code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (alpha,) = a.alphas
    sft_model = AutoModelForCausalLM.from_pretrained(a.sft, dtype=torch.bfloat16)
    dpo_model = AutoModelForCausalLM.from_pretrained(a.aligned, dtype=torch.bfloat16)
    assert len(sft_model.state_dict()) == len(dpo_model.state_dict())
    sft_state = sft_model.state_dict()  # the original calls state_dict() once per parameter
    for name, dpo_param in dpo_model.named_parameters():
        sft_param = sft_state[name]
        dpo_param.data = dpo_param.data + alpha * (dpo_param.data - sft_param.data)
    dpo_model.save_pretrained(a.out)
    AutoTokenizer.from_pretrained(a.aligned).save_pretrained(a.out)
    return 0


def worker_copy(a: argparse.Namespace) -> int:
    """Read both models once; write len(alphas) copies of the aligned model. Plain file I/O."""
    src_s, src_a, out = Path(a.sft), Path(a.aligned), Path(a.out)
    buf = bytearray(16 * 2**20)
    view = memoryview(buf)
    dests = [out / f"alpha-{alpha:g}" for alpha in a.alphas]
    for d in dests:
        d.mkdir(parents=True, exist_ok=True)
    for path in sorted(src_s.iterdir()):  # the SFT bytes are read (and dropped)
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    for path in sorted(src_a.iterdir()):
        if not path.is_file():
            continue
        outs = [open(d / path.name, "wb", buffering=0) for d in dests]
        try:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    for o in outs:
                        o.write(view[:n])
            for o in outs:
                os.fsync(o.fileno())
        finally:
            for o in outs:
                o.close()
    return 0


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="extrapolate_bench.py _worker")
    p.add_argument("kind", choices=["expo-ray", "paper", "copy"])
    p.add_argument("--sft", required=True)
    p.add_argument("--aligned", required=True)
    p.add_argument("--alphas", type=_floats, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--options", default="{}")
    p.add_argument("--result", default="")
    a = p.parse_args(argv)
    return {"expo-ray": worker_expo_ray, "paper": worker_paper, "copy": worker_copy}[a.kind](a)


# ---------------------------------------------------------------------------------------------
# mergekit in its own virtualenv
# ---------------------------------------------------------------------------------------------


def ensure_mergekit(venv: Path, log_path: Path) -> Path:
    """Create ``venv`` with mergekit from PyPI (torch first, so pip keeps the CPU wheel)."""
    exe = venv / "bin" / "mergekit-yaml"
    marker = venv / f".installed-mergekit-{MERGEKIT_VERSION}"
    if exe.exists() and marker.exists():
        return exe
    print(f"installing mergekit {MERGEKIT_VERSION} into {venv} (log: {log_path}) ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        def sh(cmd):
            log.write(("$ " + shlex.join(cmd) + "\n").encode())
            log.flush()
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)

        base_python = getattr(sys, "_base_executable", sys.executable)
        sh([base_python, "-m", "venv", str(venv)])
        (venv / ".gitignore").write_text("*\n")  # keep the venv out of git wherever it lives
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        sh(pip + [TORCH_SPEC])
        sh(pip + [f"mergekit=={MERGEKIT_VERSION}"])
    marker.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    print(f"mergekit installed in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return exe


def mergekit_config(sft: Path, aligned: Path, alpha: float) -> str:
    # YAML is a superset of JSON: no YAML library needed here.
    return json.dumps({
        "merge_method": "linear",
        "models": [
            {"model": str(aligned), "parameters": {"weight": 1.0 + alpha}},
            {"model": str(sft), "parameters": {"weight": -alpha}},
        ],
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# Checking outputs: one tensor of every variant against the correctly rounded result
# ---------------------------------------------------------------------------------------------


def _load_tensor(model_dir: Path, name: str):
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        fname = json.loads(index.read_text())["weight_map"][name]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        fname = next(f.name for f in files if name in safe_open(str(f), "pt").keys())
    with safe_open(str(model_dir / fname), framework="pt") as f:
        return f.get_tensor(name)


def _round_bf16_exact(q) -> float:
    """A Fraction rounded once, to nearest-even, to bf16 (finite range)."""
    import math
    from fractions import Fraction

    if q == 0:
        return 0.0
    sign, q = (-1.0 if q < 0 else 1.0), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()  # 2**e <= q < 2**(e+2)
    if Fraction(2) ** e > q:
        e -= 1
    elif Fraction(2) ** (e + 1) <= q:
        e += 1
    ulp = Fraction(2) ** (max(e, -126) - 7)
    m = q / ulp
    k = math.floor(m)
    rest = m - k
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and k % 2 == 1):
        k += 1
    return sign * float(k * ulp)


def exact_bf16(aligned, sft, alpha: float):
    """aligned + alpha * (aligned - sft), with alpha as the float64 it is, rounded ONCE to bf16.

    float64 arithmetic gets every element right except those within float64 error of a bf16
    rounding midpoint (alpha = 0.1 is not 1/10, and such ties are common for bf16 inputs): those
    are recomputed exactly with fractions. Round-to-odd float64 -> float32 and then float32 ->
    bf16 (nearest-even) rounds the rest once.
    """
    from fractions import Fraction

    import numpy as np
    import torch

    a = aligned.double().numpy().ravel()
    s = sft.double().numpy().ravel()
    x = a + alpha * (a - s)
    f = x.astype(np.float32)
    over = np.abs(f.astype(np.float64)) > np.abs(x)
    f = np.where(over, np.nextafter(f, np.float32(0)), f).astype(np.float32)
    inexact = (f.astype(np.float64) != x).astype(np.uint32)
    f = (f.view(np.uint32) | inexact).view(np.float32)
    out = torch.from_numpy(f).to(torch.bfloat16)
    # Elements whose float64 value is within ~2**-40 (relative) of a bf16 midpoint.
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(np.where(x == 0, 1.0, x))))
    ulp = np.exp2(np.maximum(e, -126) - 7)
    t = np.abs(x) / ulp
    near = np.abs(t - np.floor(t) - 0.5) <= np.abs(t) * 2.0**-40
    fa = Fraction(alpha)
    for i in np.nonzero(near)[0]:
        ai = Fraction(float(a[i]))
        out[i] = _round_bf16_exact(ai + fa * (ai - Fraction(float(s[i]))))
    return out.reshape(aligned.shape)


def find_variants(out: Path, alphas: list[float]) -> dict[float, Path]:
    """Map alpha -> variant folder under ``out`` (by a manifest's "alpha", else by folder name)."""
    found: dict[float, Path] = {}
    dirs = sorted({p.parent for p in out.rglob("*.safetensors")})
    for d in dirs:
        alpha = None
        for mf in sorted(d.glob("*.json")):
            if mf.name in ("config.json", "generation_config.json", "tokenizer.json",
                           "tokenizer_config.json", "special_tokens_map.json",
                           "model.safetensors.index.json"):
                continue
            try:
                data = json.loads(mf.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("alpha"), (int, float)):
                alpha = float(data["alpha"])
                break
        if alpha is None:
            rel = str(d.relative_to(out)).replace("p", ".")
            nums = re.findall(r"\d+(?:\.\d+)?", rel)
            if nums:
                alpha = float(nums[-1])
        for want in alphas:
            if alpha is not None and abs(alpha - want) < 1e-9:
                found[want] = d
    return found


def check_outputs(out: Path, sft: Path, aligned: Path, alphas: list[float]) -> str:
    try:
        s = _load_tensor(sft, CHECK_TENSOR)
        a = _load_tensor(aligned, CHECK_TENSOR)
        variants = find_variants(out, alphas)
        if len(variants) != len(alphas):
            return f"n/a (found {len(variants)}/{len(alphas)} variants)"
        bad = total = 0
        for alpha, d in variants.items():
            got = _load_tensor(d, CHECK_TENSOR)
            if got.dtype != a.dtype or got.shape != a.shape:
                return f"wrong dtype/shape {got.dtype} {tuple(got.shape)}"
            ref = exact_bf16(a, s, alpha)
            bad += int((got != ref).sum())
            total += ref.numel()
        return f"{100.0 * bad / total:.2f}%"
    except Exception as exc:  # noqa: BLE001 - a check must not kill the benchmark
        return f"n/a ({type(exc).__name__}: {exc})"[:60]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    size: str
    wall: float | None = None
    peak_rss: int | None = None
    peak_anon: int | None = None
    peak_label: str = ""
    mismatch: str = ""
    note: str = ""
    ratio_base: bool = False  # this row's wall is the copy floor's, the denominator of the ratio
    extra: dict = field(default_factory=dict)
    walls: list = field(default_factory=list)  # one per round


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _fold(results: list[ProcResult]) -> tuple[float, int, int, str, int]:
    wall = sum(r.wall for r in results)
    top = max(results, key=lambda r: r.peak_rss)
    rc = next((r.rc for r in results if r.rc != 0), 0)
    return wall, top.peak_rss, max(r.peak_anon for r in results), top.peak_label, rc


def run_method(method: str, sft: Path, aligned: Path, alphas: list[float], out: Path,
               logs: Path, size_label: str, args) -> list[Row]:
    env = _env()
    me = [sys.executable, str(Path(__file__).resolve()), "_worker"]
    common = ["--sft", str(sft), "--aligned", str(aligned)]
    log = logs / f"{method}-{size_label.replace(' ', '')}.log"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []

    if method in ("expo-ray", "expo-ray-sha256"):
        result = out.parent / "expo-ray-result.json"
        options = dict(args.expo_options, **({"sha256": True} if method == "expo-ray-sha256" else {}))
        r = run_measured(me + ["expo-ray", *common, "--alphas", ",".join(map(repr, alphas)),
                               "--out", str(out), "--options", json.dumps(options),
                               "--result", str(result)], log, env)
        if r.rc == EXIT_NO_API:
            return [Row(method, size_label, note="skipped: " + _tail(log, 1))]
        if r.rc != 0:
            return [Row(method, size_label, note=f"FAILED rc={r.rc}, see {log}")]
        t = json.loads(result.read_text())
        label = "expo-ray" if method == "expo-ray" else "expo-ray --sha256 (one task per shard)"
        rows.append(Row(f"{label}: Ray start-up (ray.init)", size_label, wall=t["ray_start_s"],
                        note="once per cluster/session, not per model"))
        rows.append(Row(label, size_label, wall=t["extrapolate_s"], peak_rss=r.peak_rss,
                        peak_anon=r.peak_anon, peak_label=r.peak_label,
                        note=f"one call, all alphas; process total {r.wall:.1f} s"))
    elif method == "paper":
        results = []
        for alpha in alphas:
            results.append(run_measured(me + ["paper", *common, "--alphas", repr(alpha),
                                              "--out", str(out / f"alpha-{alpha:g}")], log, env))
            if results[-1].rc != 0:
                break
        wall, rss, anon, label, rc = _fold(results)
        if rc:
            return [Row(method, size_label, note=f"FAILED rc={rc}, see {log}")]
        rows.append(Row("paper (transformers, bf16)", size_label, wall=wall + sync_disk(),
                        peak_rss=rss, peak_anon=anon, peak_label=label,
                        note=f"{len(alphas)} process(es), one per alpha"))
    elif method == "mergekit":
        try:
            exe = ensure_mergekit(args.mergekit_venv, logs / "mergekit-install.log")
        except (subprocess.CalledProcessError, OSError) as exc:
            return [Row(method, size_label, note=f"install FAILED ({exc}); see "
                                                 f"{logs / 'mergekit-install.log'}")]
        results = []
        for alpha in alphas:
            cfg = out / f"mergekit-alpha-{alpha:g}.yml"
            cfg.write_text(mergekit_config(sft, aligned, alpha))
            results.append(run_measured([str(exe), str(cfg), str(out / f"alpha-{alpha:g}")],
                                        log, env))
            if results[-1].rc != 0:
                break
        wall, rss, anon, label, rc = _fold(results)
        if rc:
            return [Row(method, size_label, note=f"FAILED rc={rc}, see {log}")]
        rows.append(Row(f"mergekit {MERGEKIT_VERSION} (linear)", size_label, wall=wall + sync_disk(),
                        peak_rss=rss, peak_anon=anon, peak_label=label,
                        note=f"{len(alphas)} process(es), one per alpha"))
    elif method == "copy":
        r = run_measured(me + ["copy", *common, "--alphas", ",".join(map(repr, alphas)),
                               "--out", str(out)], log, env)
        if r.rc != 0:
            return [Row(method, size_label, note=f"FAILED rc={r.rc}, see {log}")]
        rows.append(Row("plain copy (I/O floor)", size_label, wall=r.wall + sync_disk(),
                        peak_rss=r.peak_rss, peak_anon=r.peak_anon, peak_label=r.peak_label,
                        mismatch="-", ratio_base=True,
                        note=f"reads both, writes {len(alphas)} copies, fsync per file"))
    else:
        raise ValueError(method)

    for row in rows:
        if row.wall is not None and not row.mismatch and not row.method.startswith("expo-ray: Ray"):
            row.mismatch = check_outputs(out, sft, aligned, alphas)
    return rows


def machine_info() -> list[str]:
    cpu, flags, cores = "?", "", set()
    try:
        phys = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            if key == "model name" and cpu == "?":
                cpu = value
            elif key == "flags" and not flags:
                flags = "AVX-512" if "avx512f" in value.split() else (
                    "AVX2" if "avx2" in value.split() else "")
            elif key == "physical id":
                phys = value
            elif key == "core id":
                cores.add((phys, value))
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) * 1024 / GIB:.1f} GiB RAM"
    except OSError:
        pass
    versions = []
    for mod in ("torch", "transformers", "safetensors", "ray"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            versions.append(f"{mod} missing")
    physical = f" ({len(cores)} physical)" if cores else ""
    return [
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu}{' (' + flags + ')' if flags else ''}, {os.cpu_count()} logical cores"
        f"{physical}, {ram}, {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}; " + ", ".join(versions),
    ]


def _fmt_gib(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def merge_rounds(rows: list[Row]) -> list[Row]:
    """One row per (method, size): the walls of every round, the largest peaks, the worst check."""
    merged: dict[tuple[str, str], Row] = {}
    for r in rows:
        m = merged.setdefault((r.method, r.size), Row(r.method, r.size, ratio_base=r.ratio_base, note=r.note,
                                                      peak_rss=0, peak_anon=0))
        if r.wall is None:
            m.note = r.note  # a failed round is reported, not hidden
            continue
        m.walls.append(r.wall)
        if (r.peak_rss or 0) >= (m.peak_rss or 0):
            m.peak_rss, m.peak_label = r.peak_rss, r.peak_label
        m.peak_anon = max(m.peak_anon or 0, r.peak_anon or 0)
        if r.mismatch and r.mismatch not in m.mismatch.split("; "):
            m.mismatch = "; ".join(x for x in (m.mismatch, r.mismatch) if x)
    for m in merged.values():
        m.wall = statistics.median(m.walls) if m.walls else None
    return list(merged.values())


def print_table(rows: list[Row], header_lines: list[str]) -> None:
    print()
    for line in header_lines:
        print(line)
    print()
    print("| method | model size | rounds | median s | min s | median / floor | per round s "
          "| peak RSS, largest process GiB | largest process | peak anon RSS GiB | mismatch vs exact | notes |")
    print("|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|---|")
    base = {r.size: r.wall for r in rows if r.ratio_base and r.wall}
    for r in rows:
        if r.wall is None:
            print(f"| {r.method} | {r.size} | 0 | - | - | - | - | - | - | - | - | {r.note} |")
            continue
        ratio = f"{r.wall / base[r.size]:.2f}" if r.size in base else "n/a"
        walls = ", ".join(f"{w:.1f}" for w in r.walls)
        print(f"| {r.method} | {r.size} | {len(r.walls)} | {r.wall:.1f} | {min(r.walls):.1f} | {ratio} | {walls} | "
              f"{_fmt_gib(r.peak_rss)} | {r.peak_label or '-'} | {_fmt_gib(r.peak_anon)} | {r.mismatch or '-'} | "
              f"{r.note} |")
    print()


def _header(args, parent: Path, cache_notes: list[str]) -> list[str]:
    if args.no_drop_caches:
        caches = "not dropped (--no-drop-caches)"
    elif cache_notes and all(n == "dropped" for n in cache_notes):
        caches = "dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every method"
    else:
        caches = "; ".join(sorted(set(cache_notes))) or "n/a"
    return ["## expo-ray extrapolation benchmark", ""] + machine_info() + [
        f"- command: {shlex.join([sys.executable, *sys.argv])}",
        f"- alphas: {', '.join(f'{a:g}' for a in args.alphas)} (all of them in every row)",
        f"- page cache: {caches}",
        f"- disk: scratch under {parent}",
        f"- load average (1 min) at the end: {os.getloadavg()[0]:.2f} "
        "(other work on the machine skews the timings)",
        f"- rounds: {args.rounds}, interleaved (each round runs every method once, in turn); median "
        "and min over rounds; median / floor = the method's median over the fsync'd copy's median",
        "- wall s: until the method's last process exits, plus a final sync(); expo-ray's row "
        "times only the extrapolate() call and its sync (its Ray start-up has its own row)",
        "- peak RSS: largest single process of the method's process tree (Ray workers "
        "included), kernel VmHWM polled every 0.1 s; includes mmap'ed file pages. anon: "
        "anonymous memory only (sampled)",
        f"- mismatch vs exact: share of elements of {CHECK_TENSOR}, over all alphas, that "
        "differ from the correctly rounded bf16 result",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        return worker_main(argv[1:])

    p = argparse.ArgumentParser(
        description="Compare expo-ray's extrapolation with the ExPO paper's script, mergekit and "
                    "a plain copy on synthetic Llama-shaped bf16 pairs; prints a markdown table.")
    p.add_argument("--sizes", type=_floats, default=[1.0, 2.0],
                   help="model sizes in GB (1e9 bytes) per model, comma-separated (default 1,2)")
    p.add_argument("--alphas", type=_floats, default=list(DEFAULT_ALPHAS),
                   help="comma-separated (default 0.1,0.2,0.3,0.4,0.5)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the scratch folder is made (default: the system temp dir, /tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch folder (inputs, outputs, logs) instead of deleting it")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the OS page cache before each method")
    p.add_argument("--mergekit-venv", type=Path, default=HERE / ".venv-mergekit",
                   help="virtualenv for mergekit (created on first use; default benchmarks/.venv-mergekit)")
    p.add_argument("--expo-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for expo_ray.api.extrapolate (VALUE parsed as JSON "
                        "when it can be); repeatable")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds: every method once per round (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    methods = [m for m in METHODS if m in methods]  # the same order in every round
    args.expo_options = {}
    for kv in args.expo_option:
        key, sep, value = kv.partition("=")
        if not sep:
            p.error(f"--expo-option wants KEY=VALUE, got {kv!r}")
        try:
            args.expo_options[key] = json.loads(value)
        except ValueError:
            args.expo_options[key] = value
    args.mergekit_venv = args.mergekit_venv.resolve()

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    from synthetic_pair import make_pair, spec_for_size

    parent = args.workdir.resolve() if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = max(spec_for_size(s * GB).nbytes() for s in args.sizes) * (2 + len(args.alphas) + 0.5)
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"not enough disk under {parent}: need ~{need / GB:.1f} GB, have {free / GB:.1f} GB",
              file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="expo-bench-", dir=parent))
    logs = scratch / "logs"
    cache_notes: list[str] = []
    rows: list[Row] = []
    print(f"scratch: {scratch}", file=sys.stderr, flush=True)
    try:
        for size in args.sizes:
            spec = spec_for_size(size * GB)
            label = f"{spec.nbytes() / GB:.2f} GB"
            pair_dir = scratch / f"pair-{size:g}GB"
            t0 = time.perf_counter()
            sft, aligned, _ = make_pair(pair_dir, size * GB, seed=args.seed)
            gen_s = time.perf_counter() - t0 + sync_disk()
            print(f"[{label}] synthetic pair ready in {gen_s:.1f} s "
                  f"({spec.layers} layers, hidden {spec.hidden})", file=sys.stderr, flush=True)
            for method in [m for _ in range(args.rounds) for m in methods]:
                if not args.no_drop_caches:
                    ok, how = drop_caches()
                    cache_notes.append(how)
                out = scratch / f"out-{method}-{size:g}GB"
                shutil.rmtree(out, ignore_errors=True)
                print(f"[{label}] {method} ...", file=sys.stderr, flush=True)
                new = run_method(method, sft, aligned, args.alphas, out, logs, label, args)
                for r in new:
                    msg = f"{r.wall:.1f} s, peak {_fmt_gib(r.peak_rss)} GiB" if r.wall else r.note
                    print(f"[{label}] {r.method}: {msg}", file=sys.stderr, flush=True)
                    if r.note.startswith("FAILED"):
                        print(_tail(logs / f"{method}-{label.replace(' ', '')}.log"),
                              file=sys.stderr)
                rows.extend(new)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(pair_dir, ignore_errors=True)
    finally:
        try:
            if rows:
                print_table(merge_rounds(rows), _header(args, parent, cache_notes))
        finally:
            if args.keep:
                print(f"kept scratch data in {scratch}", file=sys.stderr)
            else:
                shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
