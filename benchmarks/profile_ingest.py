"""The receive path to profile: one in-process Nidaan (``dicom.receivers = 0``, so one process
holds it all) receiving a CT study on four ``storescu`` associations.

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record --gil -r 250 -f raw -o gil.txt -- .venv/bin/python \\
        benchmarks/profile_ingest.py [--slices 300]

``--gil`` samples only the thread holding the GIL: where the receiving process's one core goes.
What the profile showed is in docs/throughput.md. Prints instances/s and CPU ms per instance.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

from ingest import send, write_series
from workload import ROOT

from nidaan.core.config import load_config
from nidaan.server.app import NidaanServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nidaan-profile-"))
    files = write_series(work / "in", args.slices, 0)
    cfg = load_config(None, environ={})
    cfg.dicom.bind, cfg.dicom.port, cfg.dicom.receivers = "127.0.0.1", 0, 0
    cfg.dicom.study_idle_timeout_s = 600  # no analysis during the sends
    cfg.storage.data_dir = work / "data"
    cfg.models.repository = ROOT / "models"
    cfg.validate()
    server = NidaanServer(cfg)
    server.start(http=False, grpc=False)
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu, system0 = usage.ru_utime + usage.ru_stime, usage.ru_stime
        took = send(server.scp.port, "NIDAAN", files, 4)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        spent = usage.ru_utime + usage.ru_stime - cpu
        system = usage.ru_stime - system0
        print(
            f"{args.slices / took:.1f} instances/s, {spent * 1e3 / args.slices:.2f} ms of CPU "
            f"per instance ({system * 1e3 / args.slices:.2f} ms of it in the kernel)"
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
