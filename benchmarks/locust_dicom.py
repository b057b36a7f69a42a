"""Turnaround under load over DICOM: locust's DicomUser (benchmarks/locustfile.py) against
``nidaan serve``, each study done when its report is back at the SCP inside locust.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/locust_dicom.py [--users 4] [--seconds 60] [--smoke] [--json PATH]

Starts ``nidaan serve`` (embedded backend) with the locust process as its peer ``LOCUST``, so
that ``@source`` sends each report back to it, and runs locust headless: ``--users`` modalities
each send a study by C-STORE (a 1024 x 1024 radiograph or four 512 x 512 CT slices, three to
one), wait for its SR, and send the next (closed loop: the load adapts to the server; for a
fixed arrival rate see benchmarks/turnaround.py). Prints locust's studies/s, median, p95 and
failures (a refused association, a failure status, or no report within 60 s). ``--smoke``: 2
users for 10 s. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when imported by run_all.py

import report  # noqa: E402
from workload import (  # noqa: E402
    ROOT,
    free_port,
    nidaan_config,
    start_nidaan,
    stop,
    wait_for_port,
)


def served(users: int, seconds: int, work: Path) -> dict[str, dict[str, str]]:
    """Locust's stats rows (by name) for a DicomUser run against ``nidaan serve``."""
    dicom_port, report_port = free_port(), free_port()
    config = nidaan_config(
        work / "nidaan.toml",
        port=dicom_port,
        data_dir=work / "data",
        models=ROOT / "models",
        peers={"LOCUST": report_port},
    )
    server = start_nidaan(config, work / "nidaan.log")
    try:
        wait_for_port(dicom_port, timeout=120, proc=server)
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "locust"),
                *("-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless"),
                *("--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s"),
                "DicomUser",
                *("--dicom-target", f"127.0.0.1:{dicom_port}", "--report-ae", "LOCUST"),
                *("--report-port", str(report_port), "--report-timeout", "60"),
                *("--csv", str(work / "locust"), "--only-summary"),
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode not in (0, 1):  # 1: some requests failed (reported below)
            raise RuntimeError(run.stderr[-2000:])
    finally:
        stop(server)
    with open(work / "locust_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    failures = work / "locust_failures.csv"
    if failures.is_file():
        with open(failures) as f:
            rows["_failures"] = {
                r["Error"]: r["Occurrences"] for r in csv.DictReader(f) if r.get("Error")
            }
    return rows


def _ms(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # "N/A" when nothing completed


def run(smoke: bool = False, *, users: int = 4, seconds: int = 60) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke``: 2 users, 10 s."""
    if smoke:
        users, seconds = 2, 10
    work = Path(tempfile.mkdtemp(prefix="nidaan-locust-dicom-"))
    try:
        stats = served(users, seconds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failures = stats.pop("_failures", {})
    agg = stats["Aggregated"]
    rate, count, failed = (
        float(agg["Requests/s"]),
        int(agg["Request Count"]),
        int(agg["Failure Count"]),
    )
    print(
        f"DICOM (locust DicomUser, {users} users, {seconds} s): {rate:.2f} studies/s, median "
        f"{agg['50%']} ms, p95 {agg['95%']} ms, {count} studies, {failed} failed"
    )
    for why, n in failures.items():
        print(f"  {n} x {why}")
    kinds = [n for n in stats if n.startswith("study -> report")]
    rows = [
        report.row(f"{users} DICOM users back to back: studies reported", rate, "studies/s"),
        report.row("study sent -> report back at locust, median", _ms(agg["50%"]), "ms"),
        report.row("study sent -> report back at locust, p95", _ms(agg["95%"]), "ms"),
        report.row(
            f"failed studies of {count}",
            failed,
            "studies",
            target="<= 0",
            why="; ".join(f"{n} x {w}" for w, n in failures.items())[:300] or None,
        ),
    ]
    args = [] if smoke else [f"--users {users}", f"--seconds {seconds}"]
    return report.result(
        "locust_dicom",
        f"locust DicomUser, {users} users: C-STORE of a whole study -> SR back at the SCP in "
        "the locust process",
        report.command_line("locust_dicom.py", smoke, *args),
        rows,
        report.plot_spec(
            "bar",
            "DICOM study -> report (locust)",
            "study kind",
            "ms",
            [k.removeprefix("study -> report ") for k in kinds],
            {
                "median": [_ms(stats[k]["50%"]) for k in kinds],
                "p95": [_ms(stats[k]["95%"]) for k in kinds],
            },
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=60)
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    data = run(args.smoke, users=args.users, seconds=args.seconds)
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
