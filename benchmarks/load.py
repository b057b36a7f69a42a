"""Load test of the gRPC API with locust, against the same work done in process.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/load.py [--users 16] [--seconds 30]

Starts ``nidaan serve`` (embedded backend, no DICOM peers) and runs ``benchmarks/locustfile.py``
headless: ``--users`` integrators each send Analyze calls back to back, three one-image
radiograph studies to one four-slice CT study. Baseline, measured in the same run before it: the
same number of threads calling ``Pipeline.analyse`` in this process on the same studies (parsing
the same bytes), i.e. the work without gRPC, the server process and locust. Prints studies/s and
latency percentiles of both. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # workload.py, also when not run as a script

from workload import (  # noqa: E402
    MIX,
    ct_studies,
    free_port,
    nidaan_config,
    radiograph_studies,
    start_nidaan,
    stop,
    wait_for_port,
)


def in_process(users: int, seconds: float) -> tuple[float, list[float]]:
    """Studies/s and latencies (ms) of ``users`` threads calling the pipeline directly."""
    from pydicom import dcmread

    from nidaan.core.config import InferenceConfig
    from nidaan.server.backends import create_backend
    from nidaan.server.model_repository import load_repository
    from nidaan.server.pipeline import Pipeline

    models = load_repository(ROOT / "models")
    pipeline = Pipeline(models, create_backend(InferenceConfig(), models))
    studies = {"radiograph": radiograph_studies(), "ct": ct_studies()}
    order = [k for k, w in MIX.items() for _ in range(w)]
    pipeline.analyse([dcmread(io.BytesIO(studies["ct"][0][0]))])  # warm up
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def user(u: int) -> None:
        for turn in itertools.count(u):
            if time.monotonic() >= deadline:
                return
            kind = order[turn % len(order)]
            study = studies[kind][turn % len(studies[kind])]
            started = time.perf_counter()
            pipeline.analyse([dcmread(io.BytesIO(b)) for b in study])
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    pipeline.backend.close()
    return len(latencies) / elapsed, latencies


def served(users: int, seconds: float, work: Path) -> dict[str, str]:
    """Locust's aggregated row for the whole run against ``nidaan serve``."""
    grpc_port, dicom_port = free_port(), free_port()
    config = nidaan_config(
        work / "nidaan.toml",
        port=dicom_port,
        data_dir=work / "data",
        models=ROOT / "models",
        extra=f'[grpc]\nbind = "127.0.0.1"\nport = {grpc_port}\n',
    )
    server = start_nidaan(config, work / "nidaan.log")
    try:
        wait_for_port(grpc_port, timeout=120, proc=server)
        locust = Path(sys.executable).parent / "locust"
        run = subprocess.run(
            [
                str(locust),
                "-f",
                str(ROOT / "benchmarks" / "locustfile.py"),
                "--headless",
                "--users",
                str(users),
                "--spawn-rate",
                str(users),
                "--run-time",
                f"{int(seconds)}s",
                "--host",
                f"127.0.0.1:{grpc_port}",
                "--csv",
                str(work / "locust"),
                "--only-summary",
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode not in (0, 1):  # 1: some requests failed (reported below)
            raise RuntimeError(run.stderr[-2000:])
    finally:
        stop(server)
    with open(work / "locust_stats.csv") as f:
        return next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    rate, latencies = in_process(args.users, args.seconds)
    q = statistics.quantiles(latencies, n=20)
    print(
        f"in process: {rate:.1f} studies/s, median {statistics.median(latencies):.0f} ms, "
        f"p95 {q[18]:.0f} ms ({len(latencies)} studies, {args.users} threads)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        row = served(args.users, args.seconds, Path(tmp))
    served_rate = float(row["Requests/s"])
    print(
        f"gRPC (locust, {args.users} users): {served_rate:.1f} studies/s, median "
        f"{row['50%']} ms, p95 {row['95%']} ms, {row['Request Count']} studies, "
        f"{row['Failure Count']} failed; {served_rate / rate:.2f}x of in process"
    )


if __name__ == "__main__":
    main()
