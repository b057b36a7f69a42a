"""Sending to Nidaan in tests: dcmtk storescu (a real sender) and pynetdicom (to read statuses)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE

from peers import DCMTK_ENV, need


def storescu(
    port: int,
    files: list[Path],
    *,
    calling: str = "MODALITY",
    called: str = "NIDAAN",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Send files with dcmtk's storescu on one association (TCP_NODELAY=1)."""
    exe = need("storescu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def c_store(port: int, datasets: list[Dataset], *, calling: str = "MODALITY") -> list[Dataset]:
    """Send datasets with pynetdicom on one association; return each response status dataset."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="NIDAAN")
    assert assoc.is_established, "Nidaan refused the association"
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
