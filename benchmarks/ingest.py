"""Ingest: a 500-slice CT study into ``nidaan serve`` on one association, against dcmtk's storescp.

    .venv/bin/python benchmarks/ingest.py [--slices 500]

Synthesises a CT series from pydicom's real CT header (512 x 512, 16-bit, about 0.5 MB a slice),
sends it with ``storescu`` (TCP_NODELAY=1) to dcmtk's ``storescp`` (the baseline; it does not
fsync) and then to ``nidaan serve`` (which writes each instance with fsync and records it in
SQLite before answering), and prints instances/s for both, plus the server's resident memory:
idle, peak while receiving, and the difference. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from workload import (
    DCMTK_ENV,
    ROOT,
    dcmtk,
    free_port,
    nidaan_config,
    sample_file,
    start_nidaan,
    stop,
    wait_for_port,
)


def ct_series(folder: Path, slices: int) -> list[Path]:
    """A synthetic 512 x 512 CT series with a real CT header (pydicom's CT_small.dcm)."""
    base = pydicom.dcmread(sample_file("CT_small.dcm"))
    base.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slices):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 512
        ds.PixelData = rng.integers(-1000, 2000, (512, 512), dtype=np.int16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def send(port: int, called: str, files: list[Path]) -> float:
    start = time.perf_counter()
    run = subprocess.run(
        [dcmtk("storescu"), "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-500:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nidaan-ingest-"))
    files = ct_series(work / "in", args.slices)
    mb = sum(f.stat().st_size for f in files) / 1e6

    port = free_port()
    (work / "scp").mkdir()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "-od", str(work / "scp"), "+xa", str(port)], env=DCMTK_ENV
    )
    try:
        wait_for_port(port, proc=scp)
        base_s = send(port, "ANY-SCP", files)
    finally:
        stop(scp)

    port = free_port()
    config = nidaan_config(
        work / "nidaan.toml", port=port, data_dir=work / "data", models=ROOT / "models"
    )
    server = start_nidaan(config)
    try:
        wait_for_port(port, timeout=120, proc=server)
        time.sleep(1.0)
        idle = rss_kib(server.pid)
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kib(server.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        nidaan_s = send(port, "NIDAAN", files)
        time.sleep(1.0)
        done.set()
        sampler.join()
    finally:
        stop(server)
    print(
        f"{args.slices} CT slices 512x512 16-bit, {mb:.0f} MB, one association, storescu "
        "with TCP_NODELAY=1"
    )
    print(f"dcmtk storescp (no fsync) : {args.slices / base_s:7.1f} instances/s")
    print(
        f"nidaan serve (fsync+SQL)  : {args.slices / nidaan_s:7.1f} instances/s "
        f"({base_s / nidaan_s:.2f}x storescp)"
    )
    print(
        f"nidaan resident memory    : idle {idle / 1024:.0f} MiB, peak while receiving "
        f"{peak / 1024:.0f} MiB, increase {(peak - idle) / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
