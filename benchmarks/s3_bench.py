"""S3 read+write throughput: expo-ray (S3 -> S3 extrapolation) vs the AWS CLI moving the same bytes.

One run, one SeaweedFS server on loopback for both (started here), the same synthetic pair:
- expo-ray reads the SFT and aligned checkpoints from S3 and writes one variant per alpha to S3;
- the AWS CLI (`aws s3 cp --recursive`, its own venv: benchmarks/.venv-awscli) downloads the same
  two checkpoints and uploads the same number of bytes (the aligned checkpoint once per alpha),
  through a RAM disk so the local disk does not slow it down.
Throughput = (bytes read + bytes written) / wall time. Ray start-up is reported separately. The
server's own CPU seconds during each run are given too: on a small machine the server shares the
cores with the client, and its share bounds what any client can reach.
With --rounds N the two alternate (expo-ray first in even rounds, the AWS CLI first in odd ones)
and the table gives every round, then the median of the per-round ratios: on a shared machine
only ratios taken side by side mean something.

    .venv/bin/python benchmarks/s3_bench.py --size-gb 1 --alphas 0.1,0.3 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
AWS_VENV = HERE / ".venv-awscli"


def aws_cli() -> Path:
    aws = AWS_VENV / "bin" / "aws"
    if not aws.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AWS_VENV)], check=True)
        subprocess.run([str(AWS_VENV / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return aws


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def upload(client, folder: Path, bucket: str, prefix: str) -> int:
    total = 0
    for p in sorted(folder.iterdir()):
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
        total += p.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint")
    ap.add_argument("--alphas", default="0.1,0.3")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of both methods")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]

    import boto3
    import ray
    from synthetic_pair import make_pair

    from expo_ray.api import extrapolate
    from expo_ray.storage.embedded_s3 import EmbeddedS3

    aws = aws_cli()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="expo-s3-bench-"))
    ramdisk = Path(tempfile.mkdtemp(prefix="expo-s3-bench-", dir="/dev/shm"))
    server = EmbeddedS3(work / "weed").start()
    try:
        os.environ.update(server.env())
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        sft_dir, aligned_dir, _ = make_pair(work / "pair", args.size_gb * 1e9, verbose=False)
        read_bytes = (upload(client, Path(sft_dir), "bench", "sft")
                      + upload(client, Path(aligned_dir), "bench", "aligned"))
        aligned_bytes = sum(p.stat().st_size for p in Path(aligned_dir).iterdir())
        shutil.rmtree(work / "pair")

        from expo_ray.cluster.ray_runtime import note_worker_env

        env = dict(os.environ)
        # The AWS CLI runs at normal priority; Ray lowers its workers' (nice 15), which on a machine
        # shared with other work would measure the scheduler rather than the transfers.
        os.environ.setdefault("RAY_worker_niceness", "0")
        aws_bytes = read_bytes + aligned_bytes * len(alphas)
        ray_starts = []

        import psutil

        def server_cpu() -> float:
            procs = [psutil.Process(server.proc.pid)]
            procs += procs[0].children(recursive=True)
            return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

        def run_expo(r: int) -> tuple[float, int, float]:
            """One run on a fresh local Ray instance (as a new job gets); its start is not counted."""
            t = time.perf_counter()
            for attempt in range(3):  # on a loaded machine the raylet can miss its start-up deadline
                try:
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
                    break
                except Exception:  # noqa: BLE001 - Ray raises a bare Exception for this
                    if attempt == 2:
                        raise
                    ray.shutdown()
                    time.sleep(5)
            note_worker_env()
            ray_starts.append(time.perf_counter() - t)
            cpu, t = server_cpu(), time.perf_counter()
            result = extrapolate("s3://bench/sft", "s3://bench/aligned", alphas, f"s3://bench/expo{r}",
                                 show_progress=False)
            seconds, cpu = time.perf_counter() - t, server_cpu() - cpu
            ray.shutdown()
            return seconds, result.bytes_read + result.bytes_written, cpu

        def run_aws(r: int) -> tuple[float, float]:
            cpu, t = server_cpu(), time.perf_counter()
            for side in ("sft", "aligned"):
                subprocess.run([str(aws), "--endpoint-url", server.endpoint, "s3", "cp", "--recursive", "--quiet",
                                f"s3://bench/{side}", str(ramdisk / f"{r}" / side)], check=True, env=env)
            for i, _ in enumerate(alphas):
                subprocess.run([str(aws), "--endpoint-url", server.endpoint, "s3", "cp", "--recursive", "--quiet",
                                str(ramdisk / f"{r}" / "aligned"), f"s3://bench/awscli{r}/{i}"], check=True, env=env)
            seconds, cpu = time.perf_counter() - t, server_cpu() - cpu
            shutil.rmtree(ramdisk / f"{r}")
            return seconds, cpu

        rounds = []  # (expo-ray run, AWS CLI run, load average at the end)
        for r in range(args.rounds):
            if r % 2 == 0:
                expo = run_expo(r)
                cli = run_aws(r)
            else:
                cli = run_aws(r)
                expo = run_expo(r)
            rounds.append((expo, cli, os.getloadavg()[0]))
    finally:
        server.close()
        shutil.rmtree(ramdisk, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"SeaweedFS on loopback; checkpoints {args.size_gb} GB each; alphas {alphas}; Ray start-up "
          f"{statistics.median(ray_starts):.1f} s (median; not counted)\n")
    print("| round | method | bytes moved (GB) | wall s | throughput MB/s | vs AWS CLI | server CPU s | load average |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for r, ((expo_s, expo_bytes, expo_cpu), (aws_s, aws_cpu), load) in enumerate(rounds):
        aws_tp = aws_bytes / aws_s / 1e6
        expo_tp = expo_bytes / expo_s / 1e6
        ratios.append(expo_tp / aws_tp)
        print(f"| {r} | expo-ray extrapolate S3 -> S3 | {expo_bytes / 1e9:.2f} | {expo_s:.1f} | {expo_tp:.0f} | "
              f"{expo_tp / aws_tp:.2f}x | {expo_cpu:.1f} | {load:.1f} |")
        print(f"| {r} | aws s3 cp (down + up, RAM disk) | {aws_bytes / 1e9:.2f} | {aws_s:.1f} | {aws_tp:.0f} | 1.00x | "
              f"{aws_cpu:.1f} | {load:.1f} |")
    print(f"\nexpo-ray vs AWS CLI: median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max "
          f"{max(ratios):.2f}x "
          f"over {len(ratios)} round(s)")


if __name__ == "__main__":
    main()
