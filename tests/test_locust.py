"""The load-test users (benchmarks/locustfile.py) against a running server: a short headless
locust run must send studies and see no failures, so the load test itself does not rot."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from conftest import make_config

ROOT = Path(__file__).resolve().parents[1]


def test_locust_users_analyse_studies_without_failures(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(make_config(tmp_path))
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "locust"),
            "-f",
            str(ROOT / "benchmarks" / "locustfile.py"),
            "--headless",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "10s",  # the clock starts before the studies are made (about 4 s)
            "--host",
            f"127.0.0.1:{server.api.port}",
            "--csv",
            str(tmp_path / "locust"),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "locust_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Request Count"]) > 0, run.stderr[-3000:]
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["Analyze radiograph"]["Request Count"]) > 0
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'nidaan_grpc_requests_total{code="OK",method="Analyze"}' in metrics
