"""The audit log: who sent what, when, and where results went (one JSON object per line).

Separate from the operational log, which carries no identifiers: an audit trail needs to name
the objects (Study and SOP Instance UIDs, as IHE ATNA audit messages do), so it lives in its own
file under the data dir, to be protected and retained like the studies themselves. It never
holds patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class AuditLog:
    """Append-only JSON lines in ``<data dir>/audit.jsonl``, flushed and fsync'd per event."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the process's life

    def record(self, event: str, **fields: Any) -> None:
        """Append one event, e.g. ``record("received", calling_ae=..., study=..., status=...)``."""
        line = json.dumps(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}, sort_keys=True
        )
        with self._lock:
            if self._fh.closed:
                return
            self._reopen_if_rotated()
            self._fh.write(line + "\n")
            self._fh.flush()
            fd = os.dup(self._fh.fileno())
        # The fsync runs outside the lock: other threads append meanwhile, and one fsync makes
        # every line written before it durable, so concurrent events share the disk's latency.
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _reopen_if_rotated(self) -> None:
        """The retention sweeper renames the file to rotate it (``pacs_bridge.retention``):
        the next record goes to a new file at the path. What was written before the rename is
        in the rotated file; nothing is lost (one ``stat`` per record)."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self._fh.close()
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            self._fh.close()
