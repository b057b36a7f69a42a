"""End-to-end latency and throughput of ``nidaan serve``, against plain DICOM transfer.

    .venv/bin/python benchmarks/end_to_end.py [--studies 20] [--rows 2048] [--columns 2048]

Starts ``nidaan serve`` with dcmtk's ``storescp`` as the PACS, sends each synthetic one-image
chest study with ``storescu`` (TCP_NODELAY=1) and times send-start to the report's arrival at the
PACS. The baseline, measured in the same run, is the same ``storescu`` sending the same files
straight to ``storescp``: the cost of the DICOM transfer alone. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from workload import (
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--columns", type=int, default=2048)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nidaan-bench-"))
    files, burst_files = [], []
    for i in range(2 * args.studies):
        ds = synthetic_cxr(1000 + i, nodule=i % 2 == 0, rows=args.rows, columns=args.columns)
        (files if i < args.studies else burst_files).append(save(ds, work / "in" / f"{i}.dcm"))
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
    mb = files[0].stat().st_size / 1e6
    t_base, t_lat = statistics.median(base), statistics.median(lat)
    print(f"{args.studies} one-image studies, {args.rows}x{args.columns} 12-bit ({mb:.1f} MB each)")
    print(f"DICOM transfer alone (storescu -> storescp): median {t_base * 1e3:7.1f} ms")
    print(
        f"study sent -> SR at the PACS via nidaan    : median {t_lat * 1e3:7.1f} ms, "
        f"max {max(lat) * 1e3:.1f} ms"
    )
    print(f"ratio (end to end / transfer alone)        : {t_lat / t_base:7.1f}x")
    print(
        f"back to back: {args.studies} studies reported in {burst:.2f} s = "
        f"{args.studies / burst:.1f} studies/s"
    )


if __name__ == "__main__":
    main()
