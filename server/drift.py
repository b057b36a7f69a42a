"""Drift statistics recorded off the analysing threads, many images per transaction.

Every image any entrance analyses adds rows (model, finding, modality, presence, probability)
to the state database's last-day window and to the metrics (:meth:`Studies.observe`). Written
where the image was analysed, that is a fsync'd SQLite commit per gRPC call or study, under the
database's lock, on the caller's thread: statistics must not cost the callers. Here callers
only queue their rows; one thread writes whatever has queued meanwhile in one transaction (a
group commit that grows with the load), then counts what was new in the metrics.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("nidaan.drift")

#: (image digest, model, finding, modality, present, probability)
Row = tuple[str, str, str, str, bool, float]


class DriftRecorder:
    """Queues rows for ``record`` (returns the rows it had not seen) and passes each new row to
    ``observe``, on a thread of its own; :meth:`close` writes what is queued, then stops."""

    def __init__(
        self,
        record: Callable[[Sequence[Row]], list[Row]],
        observe: Callable[[Row], None],
    ) -> None:
        self._record = record
        self._observe = observe
        self._queue: queue.SimpleQueue[list[Row] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="nidaan-drift", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        """Queue rows; returns at once."""
        if rows:
            self._queue.put(rows)

    def close(self) -> None:
        """Write what is queued and stop the thread (idempotent)."""
        if self.thread.is_alive():
            self._queue.put(None)
            self.thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[Row] = []
            item: list[Row] | None = first
            while True:
                if item is None:
                    stopping = True
                else:
                    batch += item
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)

    def _write(self, batch: list[Row]) -> None:
        try:
            new = self._record(batch)
        except sqlite3.Error as exc:  # statistics must not fail anything: count them anyway
            log.error("could not record findings for drift: %s", exc)
            new = batch
        for row in new:
            try:
                self._observe(row)
            except Exception:  # a metrics bug must not stop the recorder
                log.exception("could not count a finding for drift")
