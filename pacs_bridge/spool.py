"""The spool: received instances on local disk, written durably, and the quarantine.

An instance is written as a DICOM Part 10 file made of the bytes the sender sent (no decode and
re-encode): preamble, the File Meta Information built from the presentation context (PS3.10 7.1),
then the received data set. The write goes to a temporary file that is fsync'd and renamed into
place, and the folder is fsync'd, so an acknowledged instance survives a crash or power loss.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from .uids import is_valid_uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class Spool:
    """Folders under the data dir: ``spool/<study>/<sop>.dcm``, ``quarantine/``, ``reports/``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "spool"
        self.quarantine_dir = data_dir / "quarantine"
        self.reports_dir = data_dir / "reports"
        for d in (self.root, self.quarantine_dir, self.reports_dir):
            d.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; UIDs are checked first so none can escape the spool."""
        for uid in (study_uid, sop_instance_uid):
            if not is_valid_uid(uid):
                raise ValueError("UID is not a valid DICOM UID")
        return self.root / study_uid / f"{sop_instance_uid}.dcm"

    def store(self, study_uid: str, sop_instance_uid: str, chunks: Iterable[bytes]) -> Path:
        """Write one instance durably and return its path."""
        path = self.instance_path(study_uid, sop_instance_uid)
        atomic_write(path, chunks)
        return path

    def quarantine(self, chunks: Iterable[bytes], reason: str, *, status: int | str) -> Path:
        """Keep a refused object with a JSON sidecar saying why; returns the object's path.

        ``status`` is the DICOM status it was refused with, or a text such as a gRPC code.

        Quarantined files are named by time, not by their (untrusted) UIDs.
        """
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns()}"
        path = self.quarantine_dir / f"{name}.dcm"
        atomic_write(path, chunks)
        shown = f"0x{status:04X}" if isinstance(status, int) else status
        info = {"reason": reason, "status": shown, "received_at": time.time()}
        atomic_write(self.quarantine_dir / f"{name}.json", [json.dumps(info, indent=1).encode()])
        return path
