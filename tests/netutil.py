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


def send_raw(
    port: int, body: bytes, sop_class: str, sop_instance: str, syntax: str = "1.2.840.10008.1.2.1"
) -> Dataset | None:
    """C-STORE ``body`` as the data set bytes, unparsed, as a broken sender would.

    pynetdicom's DIMSE layer is used directly: its ``send_c_store`` and dcmtk's ``storescu``
    both refuse to send a data set they cannot parse themselves.
    """
    import time
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="NIDAAN")
    assert assoc.is_established, "Nidaan refused the association"
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(body)
        # Pause the association's reactor as pynetdicom's own send_c_store does, or it may
        # take the response off the queue first.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None:
            return None
        status = Dataset()
        status.Status = rsp.Status
        if getattr(rsp, "ErrorComment", None):
            status.ErrorComment = rsp.ErrorComment
        return status
    finally:
        assoc.release()
