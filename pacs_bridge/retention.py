"""Storage lifecycle: what the data dir keeps, for how long, and within what size.

A node runs for months; without this the spool, the reports, the quarantine and the audit log
grow until the disk is full and every study is refused. :class:`Sweeper` applies the
``[retention]`` settings in the background (``server.app`` runs it every ``interval_s``):

* **spool** and **reports**: a study's instances and its result objects may go once the study
  needs nothing more: it is ``delivered`` (every object arrived), ``skipped`` or ``failed``, or
  ``reported`` with nothing left to deliver. A study still being received or analysed, or with a
  delivery queued or dead-lettered (waiting for ``nidaan outbox --resend``), is never touched.
  First what is older than ``*_days``; then, while an area is over ``*_max_gb``, the oldest
  prunable studies first.
* **quarantine**: refused objects (a ``.dcm`` and its ``.json`` reason) older than
  ``quarantine_days``, then the oldest while over ``quarantine_max_gb``.
* **audit log**: ``audit.jsonl`` is rotated to ``audit-<time>.jsonl`` once it passes
  ``audit_rotate_mb`` or holds a previous day's records (every writer reopens the path on its
  next record, see :class:`~nidaan.pacs_bridge.audit.AuditLog`); rotated files older than
  ``audit_days`` go, then the oldest rotated files while the log (rotated and current) is over
  ``audit_max_gb``; the current file is never removed.

Every removal is written to the audit log (``pruned``: area, study, files, bytes), and the
sizes of the areas and the free space are kept for the metrics and the status page.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nidaan.core.config import RetentionConfig

from .audit import AuditLog
from .spool import Spool
from .state import StateStore
from .uids import ref

log = logging.getLogger("nidaan.retention")

__all__ = ["AREAS", "SweepResult", "Sweeper", "folder_bytes"]

#: The areas of the data dir, as the metrics and the status page name them.
AREAS = ("spool", "reports", "quarantine", "audit")
_DAY = 86400.0
_GB = 1 << 30


def folder_bytes(folder: Path) -> int:
    """Bytes of the files below ``folder`` (0 if it does not exist)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                total += os.stat(os.path.join(dirpath, name), follow_symlinks=False).st_size
    return total


@dataclass
class SweepResult:
    """What one sweep removed (files and bytes per area) and the sizes after it."""

    removed_files: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AREAS, 0))
    removed_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AREAS, 0))
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AREAS, 0))
    free_bytes: int = 0
    studies_pruned: int = 0


class Sweeper:
    """Applies ``[retention]`` to one data dir (see the module docstring)."""

    def __init__(
        self,
        config: RetentionConfig,
        spool: Spool,
        state: StateStore,
        audit: AuditLog,
        *,
        on_sweep: Callable[[SweepResult], None] = lambda result: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.spool = spool
        self.state = state
        self.audit = audit
        self._on_sweep = on_sweep
        self._clock = clock
        #: The last sweep's result (sizes for the status page); None before the first.
        self.last: SweepResult | None = None

    def sweep(self) -> SweepResult:
        """One pass over every area; its result."""
        now = self._clock()
        result = SweepResult()
        self._studies(now, result)
        self._quarantine(now, result)
        self._audit(now, result)
        result.sizes = {
            "spool": folder_bytes(self.spool.root),
            "reports": folder_bytes(self.spool.reports_dir),
            "quarantine": folder_bytes(self.spool.quarantine_dir),
            "audit": sum(p.stat().st_size for p in self._audit_files(include_current=True)),
        }
        result.free_bytes = shutil.disk_usage(self.spool.root).free
        self.last = result
        self._on_sweep(result)
        if result.studies_pruned or any(result.removed_files.values()):
            log.info(
                "retention: pruned %d studies; removed %s",
                result.studies_pruned,
                ", ".join(
                    f"{area} {result.removed_files[area]} files ({result.removed_bytes[area]} B)"
                    for area in AREAS
                    if result.removed_files[area]
                ),
            )
        return result

    # --- studies: spool and reports --------------------------------------------------------------

    def _studies(self, now: float, result: SweepResult) -> None:
        cfg = self.config
        for area, days, max_gb in (
            ("spool", cfg.spool_days, cfg.spool_max_gb),
            ("reports", cfg.reports_days, cfg.reports_max_gb),
        ):
            if not days and not max_gb:
                continue  # kept for ever, whatever its size
            left = self.state.prunable_studies(area)  # oldest first: (study, updated_at)
            if days > 0:
                for study, updated in list(left):
                    if now - updated >= days * _DAY:
                        self._prune(area, study, f"older than {area}_days ({days:g})", result)
                        left.remove((study, updated))
            if max_gb > 0:
                limit = int(max_gb * _GB)
                size = folder_bytes(self._folder(area))
                for study, _ in left:
                    if size <= limit:
                        break
                    size -= self._prune(area, study, f"{area} over {area}_max_gb", result)

    def _folder(self, area: str) -> Path:
        return self.spool.root if area == "spool" else self.spool.reports_dir

    def _prune(self, area: str, study: str, why: str, result: SweepResult) -> int:
        """Remove one study's files of ``area``; the bytes removed.

        Only what the state database lists is removed, and only if the study still needs
        nothing more, checked in the same transaction that forgets the files (see
        :meth:`StateStore.prune`): an instance that arrives meanwhile, or a report made again,
        keeps its file and its rows."""
        removed = 0
        count = 0

        def remove(files: list[Path]) -> None:
            nonlocal removed, count
            for path in files:
                size = self._unlink(path)
                if size is not None:
                    removed += size
                    count += 1

        if self.state.prune(study, area, remove) is None:
            return 0
        if area == "spool":
            with contextlib.suppress(OSError):  # only when nothing else arrived there
                (self.spool.root / study).rmdir()
            result.studies_pruned += 1
        result.removed_files[area] += count
        result.removed_bytes[area] += removed
        self.audit.record("pruned", area=area, study=study, files=count, bytes=removed, why=why)
        log.debug("pruned %s of study %s: %d files", area, ref(study), count)
        return removed

    def _unlink(self, path: Path) -> int | None:
        """Delete one file; its size, or None if it was gone already."""
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size

    # --- quarantine ------------------------------------------------------------------------------

    def _quarantine(self, now: float, result: SweepResult) -> None:
        cfg = self.config
        folder = self.spool.quarantine_dir
        groups: dict[str, list[Path]] = {}
        for path in folder.glob("*"):
            if path.is_file() and not path.name.startswith("."):
                groups.setdefault(path.stem, []).append(path)
        entries = []  # (time, name, files, bytes), oldest first
        for name, paths in groups.items():
            try:
                stats = [p.stat() for p in paths]
            except FileNotFoundError:
                continue
            entries.append(
                (min(s.st_mtime for s in stats), name, paths, sum(s.st_size for s in stats))
            )
        entries.sort()
        total = sum(e[3] for e in entries)
        limit = int(cfg.quarantine_max_gb * _GB) if cfg.quarantine_max_gb > 0 else None
        for mtime, name, paths, size in entries:
            old = cfg.quarantine_days > 0 and now - mtime >= cfg.quarantine_days * _DAY
            over = limit is not None and total > limit
            if not (old or over):
                continue
            for p in paths:
                p.unlink(missing_ok=True)
            total -= size
            result.removed_files["quarantine"] += len(paths)
            result.removed_bytes["quarantine"] += size
            why = "older than quarantine_days" if old else "quarantine over quarantine_max_gb"
            self.audit.record(
                "pruned", area="quarantine", entry=name, files=len(paths), bytes=size, why=why
            )

    # --- audit log -------------------------------------------------------------------------------

    def _audit_files(self, *, include_current: bool = False) -> list[Path]:
        folder = self.audit.path.parent
        rotated = sorted(folder.glob(f"{self.audit.path.stem}-*.jsonl"))
        if include_current and self.audit.path.exists():
            return [*rotated, self.audit.path]
        return rotated

    def _audit(self, now: float, result: SweepResult) -> None:
        cfg = self.config
        path = self.audit.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and (size >= cfg.audit_rotate_mb * (1 << 20) or _first_day(path) != _day(now)):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now))
            target = path.with_name(f"{path.stem}-{stamp}.jsonl")
            if not target.exists():
                os.replace(path, target)  # writers reopen the path on their next record
        rotated = []  # (file, bytes), oldest first (the names sort by time)
        for f in self._audit_files():
            with contextlib.suppress(FileNotFoundError):
                rotated.append((f, f.stat().st_size))
        current = 0
        with contextlib.suppress(FileNotFoundError):
            current = path.stat().st_size
        total = current + sum(size for _, size in rotated)
        limit = int(cfg.audit_max_gb * _GB) if cfg.audit_max_gb > 0 else None
        for old, size in rotated:
            aged = cfg.audit_days > 0 and now - old.stat().st_mtime >= cfg.audit_days * _DAY
            over = limit is not None and total > limit
            if not (aged or over):
                continue
            old.unlink(missing_ok=True)
            total -= size
            result.removed_files["audit"] += 1
            result.removed_bytes["audit"] += size
            why = "older than audit_days" if aged else "audit log over audit_max_gb"
            self.audit.record("pruned", area="audit", entry=old.name, files=1, bytes=size, why=why)


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))


def _first_day(path: Path) -> str:
    """The local date of the first record of an audit file ('' if it has none readable)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return str(json.loads(first)["time"])[:10]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
