"""End-to-end latency and throughput of ``nidaan serve``, against plain DICOM transfer.

    .venv/bin/python benchmarks/end_to_end.py [--studies 20] [--rows 2048] [--columns 2048]
                                              [--smoke] [--json PATH]

Starts ``nidaan serve`` with dcmtk's ``storescp`` as the PACS, sends each synthetic one-image
chest study with ``storescu`` (TCP_NODELAY=1) and times send-start to the report's arrival at the
PACS. The baseline, measured in the same run, is the same ``storescu`` sending the same files
straight to ``storescp``: the cost of the DICOM transfer alone. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when imported by run_all.py

import report  # noqa: E402
from workload import (  # noqa: E402
    DCMTK_ENV,
    ROOT,
    dcmtk,
    free_port,
    nidaan_config,
    save,
    start_nidaan,
    stop,
    synthetic_cxr,
    wait_for_port,
)


def _send(port: int, path: Path, called: str) -> None:
    run = subprocess.run(
        [dcmtk("storescu"), "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port), str(path)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr)


def _wait_files(folder: Path, pattern: str, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(pattern))) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} files {pattern} did not arrive in {folder}")
        time.sleep(0.005)


def measure(studies: int, rows: int, columns: int) -> dict[str, Any]:
    """Baseline transfer times, end-to-end latencies and the back-to-back time (seconds)."""
    work = Path(tempfile.mkdtemp(prefix="nidaan-bench-"))
    files: list[Path] = []
    burst_files: list[Path] = []
    for i in range(2 * studies):
        ds, _ = synthetic_cxr(1000 + i, nodule=i % 2 == 0, rows=rows, columns=columns)
        (files if i < studies else burst_files).append(save(ds, work / "in" / f"{i}.dcm"))
    mb = files[0].stat().st_size / 1e6
    pacs_port, nidaan_port = free_port(), free_port()
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)],
        env=DCMTK_ENV,
    )
    wait_for_port(pacs_port, proc=pacs)
    config = nidaan_config(
        work / "nidaan.toml",
        port=nidaan_port,
        data_dir=work / "data",
        models=ROOT / "models",
        extra='[reports]\ndestinations = ["PACS"]\n',
        peers={"PACS": pacs_port},
    )
    nidaan = start_nidaan(config)
    try:
        wait_for_port(nidaan_port, timeout=120, proc=nidaan)
        # Baseline: the same transfer straight to the PACS.
        base = []
        for path in files:
            start = time.perf_counter()
            _send(pacs_port, path, "PACS")
            base.append(time.perf_counter() - start)
        lat = []
        for i, path in enumerate(files):
            start = time.perf_counter()
            _send(nidaan_port, path, "NIDAAN")
            _wait_files(pacs_dir, "SR*", i + 1)
            lat.append(time.perf_counter() - start)
        start = time.perf_counter()
        for path in burst_files:  # throughput: back to back, reports arrive as they are ready
            _send(nidaan_port, path, "NIDAAN")
        _wait_files(pacs_dir, "SR*", 2 * len(files))
        burst = time.perf_counter() - start
    finally:
        stop(nidaan)
        stop(pacs)
        shutil.rmtree(work, ignore_errors=True)
    return {"base": base, "lat": lat, "burst": burst, "mb": mb}


def run(
    smoke: bool = False, *, studies: int = 20, rows: int = 2048, columns: int = 2048
) -> dict[str, Any]:
    """The benchmark convention's dict (benchmarks/README.md); ``smoke``: 3 studies of 512 x
    512."""
    if smoke:
        studies, rows, columns = 3, 512, 512
    m = measure(studies, rows, columns)
    base, lat, burst = m["base"], m["lat"], m["burst"]
    t_base, t_lat = statistics.median(base), statistics.median(lat)
    print(f"{studies} one-image studies, {rows}x{columns} 12-bit ({m['mb']:.1f} MB each)")
    print(f"DICOM transfer alone (storescu -> storescp): median {t_base * 1e3:7.1f} ms")
    print(
        f"study sent -> SR at the PACS via nidaan    : median {t_lat * 1e3:7.1f} ms, "
        f"max {max(lat) * 1e3:.1f} ms"
    )
    print(f"ratio (end to end / transfer alone)        : {t_lat / t_base:7.1f}x")
    print(
        f"back to back: {studies} studies reported in {burst:.2f} s = "
        f"{studies / burst:.1f} studies/s"
    )
    args = [] if smoke else [f"--studies {studies}", f"--rows {rows}", f"--columns {columns}"]
    return report.result(
        "end_to_end",
        f"One-image {rows}x{columns} 12-bit chest studies: storescu -> nidaan serve -> SR at a "
        "storescp PACS, against the DICOM transfer alone",
        report.command_line("end_to_end.py", smoke, *args),
        [
            report.row(
                "study sent -> SR at the PACS, median",
                t_lat * 1e3,
                "ms",
                baseline="DICOM transfer alone (storescu -> storescp)",
                baseline_value=t_base * 1e3,
            ),
            report.row("study sent -> SR at the PACS, max", max(lat) * 1e3, "ms"),
            report.row("back to back, reported", studies / burst, "studies/s"),
        ],
        report.plot_spec(
            "line",
            "Study sent -> SR at the PACS, one study at a time",
            "study",
            "ms",
            list(range(1, studies + 1)),
            {
                "nidaan end to end": [t * 1e3 for t in lat],
                "DICOM transfer alone": [t * 1e3 for t in base],
            },
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--columns", type=int, default=2048)
    report.add_convention_arguments(parser)
    args = parser.parse_args()
    data = run(args.smoke, studies=args.studies, rows=args.rows, columns=args.columns)
    report.write_json(data, args.json)


if __name__ == "__main__":
    main()
