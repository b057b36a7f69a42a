"""The load-test users (benchmarks/locustfile.py) against a running server: a short headless
locust run must send studies and see no failures, so the load test itself does not rot; the
DICOM user must count a study done only when its report comes back."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from conftest import make_config
from peers import free_port, nidaan_config, start_nidaan, stop, wait_for_port

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
            "10s",  # the clock starts once the studies are made (locustfile.py)
            "--host",
            f"127.0.0.1:{server.api.port}",
            "IntegratorUser",
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


def _locust_dicom(
    tmp_path: Path,
    name: str,
    dicom_port: int,
    ae: str,
    report_port: int,
    timeout_s: float,
    seconds: int,
) -> dict[str, dict[str, str]]:
    """A short headless run of the DICOM user; locust's stats rows by name."""
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "locust"),
            "-f",
            str(ROOT / "benchmarks" / "locustfile.py"),
            "--headless",
            *("--users", "2", "--spawn-rate", "2"),
            "--run-time",
            f"{seconds}s",  # the clock starts once the studies are made (locustfile.py)
            "DicomUser",
            *("--dicom-target", f"127.0.0.1:{dicom_port}", "--report-ae", ae),
            *("--report-port", str(report_port), "--report-timeout", str(timeout_s)),
            *("--csv", str(tmp_path / name), "--only-summary"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode in (0, 1), run.stderr[-3000:]  # 1: some requests failed
    with open(tmp_path / f"{name}_stats.csv") as f:
        return {r["Name"]: r for r in csv.DictReader(f)}


def test_locust_dicom_user_counts_studies_done_when_their_report_arrives(tmp_path: Path) -> None:
    """The DICOM user against a real ``nidaan serve``: studies whose report comes back to the
    SCP inside locust succeed; a study whose report never comes is a failure, not a success."""
    dicom_port, report_port = free_port(), free_port()
    config = nidaan_config(
        tmp_path / "nidaan.toml",
        port=dicom_port,
        data_dir=tmp_path / "data",
        models=ROOT / "models",
        peers={"LOCUST": report_port},  # reports go back to @source: the locust process
    )
    server = start_nidaan(config, tmp_path / "nidaan.log")
    try:
        wait_for_port(dicom_port, timeout=120, proc=server)
        # First a caller that is not a peer: Nidaan stores and analyses its studies but has
        # nowhere to send their reports, so each must end as a failure after the timeout (and
        # the server's kernels are warm for the run after).
        stranger = _locust_dicom(tmp_path, "stranger", dicom_port, "STRANGER", free_port(), 3, 10)
        assert int(stranger["Aggregated"]["Failure Count"]) > 0, stranger
        assert int(stranger["Aggregated"]["Failure Count"]) == int(
            stranger["Aggregated"]["Request Count"]
        ), stranger
        rows = _locust_dicom(tmp_path, "peer", dicom_port, "LOCUST", report_port, 60, 15)
    finally:
        stop(server)
    log = (tmp_path / "nidaan.log").read_text()
    assert int(rows["Aggregated"]["Request Count"]) > 0, (rows, log[-3000:])
    assert int(rows["Aggregated"]["Failure Count"]) == 0, (rows, log[-3000:])
    assert int(rows["study -> report radiograph"]["Request Count"]) > 0, rows
