"""The spool: received instances on local disk, written durably, and the quarantine.

An instance is written as a DICOM Part 10 file made of the bytes the sender sent (no decode and
re-encode): preamble, the File Meta Information built from the presentation context (PS3.10 7.1),
then the received data set: the very file the SCP staged in ``tmp/``, fsync'd, hard-linked under
a temporary name and renamed into place (:meth:`Spool.adopt`; other writes go to a temporary file
that is fsync'd and renamed), and the folder is fsync'd, so an acknowledged instance survives a
crash or power loss.

Nothing that holds patient data is written outside the data dir: the SCP's receive stages each
incoming data set in ``tmp/`` (mode 0700), and :meth:`Spool.sweep` removes, at start, what a crash
left there and the temporary files of writes it interrupted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .uids import is_valid_uid

log = logging.getLogger("nidaan.spool")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_partial_write(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files."""
    return name.startswith(".") and name.endswith(".tmp")


def atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named so that Spool.sweep recognises it (_is_partial_write) if a crash leaves it behind.
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


class FileChunks:
    """The bytes of a file in 1 MiB chunks; iterable again and again (store, quarantine)."""

    def __init__(self, path: Path, size: int, chunk: int = 1 << 20) -> None:
        self.path = path
        self.size = size
        self.chunk = chunk

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            while block := fh.read(self.chunk):
                yield block


@dataclass(frozen=True)
class Quarantined:
    """What :meth:`Spool.quarantine` kept: always the reason (``<name>.json``), and the object's
    bytes (``<name>.dcm``) unless ``kept`` is false, when ``not_kept`` says why."""

    name: str
    kept: bool
    not_kept: str = ""


@dataclass(frozen=True)
class Swept:
    """What :meth:`Spool.sweep` removed (counts only: the files' names hold UIDs)."""

    staged: int = 0
    partial_writes: int = 0
    #: False when another server holds the data dir: its files were left alone.
    swept: bool = True


class Spool:
    """Folders under the data dir: ``spool/<study>/<sop>.dcm``, ``quarantine/``, ``reports/``,
    and ``tmp/``, where the SCP stages data sets while they arrive."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "spool"
        self.quarantine_dir = data_dir / "quarantine"
        self.reports_dir = data_dir / "reports"
        self.staging_dir = data_dir / "tmp"
        for d in (self.root, self.quarantine_dir, self.reports_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Staged data sets are whole instances, patient names included: this user's only, like
        # the system temp dir's files but never shared with other users' temporary files.
        self.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.staging_dir, 0o700)  # mkdir's mode is masked by umask; a folder may exist
        self._owner: weakref.finalize | None = None

    def sweep(self) -> Swept:
        """Remove what a crashed run left: data sets staged while they arrived, and
        :func:`atomic_write`'s temporary files in the spool, quarantine and reports folders.

        Call it before the SCP listens. Only the process that holds the data dir sweeps it: the
        first call takes an exclusive lock (``flock`` on the staging folder) and keeps it for the
        process's life; the kernel releases it when the process ends, ``kill -9`` included. A
        second process started on the same data dir by mistake therefore never deletes the
        first one's files in progress (it logs a warning and sweeps nothing). :meth:`close`, or
        this object's collection, lets the lock go.
        """
        if self._owner is None:
            fd = os.open(self.staging_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                log.warning(
                    "not sweeping the data dir: another server holds it (two servers must not "
                    "share a data dir)"
                )
                return Swept(swept=False)
            self._owner = weakref.finalize(self, os.close, fd)
        staged = 0
        with os.scandir(self.staging_dir) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    staged += 1
        partial = 0
        for folder in (self.root, self.quarantine_dir, self.reports_dir):
            for dirpath, _, names in os.walk(folder):
                for name in filter(_is_partial_write, names):
                    os.unlink(os.path.join(dirpath, name))
                    partial += 1
        if staged or partial:
            log.warning(
                "removed what an interrupted run left: %d staged data set(s), %d partial write(s)",
                staged,
                partial,
            )
        return Swept(staged, partial)

    def close(self) -> None:
        """Let another server take the data dir (releases :meth:`sweep`'s lock; idempotent)."""
        if self._owner is not None:
            self._owner()
            self._owner = None

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

    def adopt(self, study_uid: str, sop_instance_uid: str, staged: Path) -> Path:
        """Make a whole file staged in ``tmp/`` the instance, durably, without copying it.

        The staged file is fsync'd, hard-linked under a temporary name beside its place in
        the spool and renamed into place, and the folder fsync'd: the same guarantees as
        :meth:`store` for one write less of every byte. Where a hard link cannot be made
        (another file system), the bytes are copied as :meth:`store` does.
        """
        path = self.instance_path(study_uid, sop_instance_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            os.link(staged, tmp)
        except OSError:
            return self.store(
                study_uid, sop_instance_uid, FileChunks(staged, staged.stat().st_size)
            )
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return path

    def quarantine(
        self,
        chunks: Iterable[bytes],
        reason: str,
        *,
        status: int | str,
        size: int,
        min_free_bytes: int,
        max_bytes: int | None = None,
        stage: str = "admission",
    ) -> Quarantined:
        """Keep a refused object (``size`` bytes) with a JSON sidecar saying why.

        ``status`` is the DICOM status it was refused with, or a text such as a gRPC code. The
        bytes are kept only when they fit ``max_bytes`` (None: any size) and the disk keeps
        ``min_free_bytes`` free after them: whoever can send can otherwise fill the disk with
        refused objects. The sidecar (a few hundred bytes) is always written; it gives the size,
        and says when and why the bytes were not kept. OSError if even that fails.

        ``stage`` says when it was refused: ``admission`` (before any answer: the sender was
        told) or ``analysis`` (acknowledged and stored, then found unusable when decoded).

        Quarantined files are named by time, not by their (untrusted) UIDs.
        """
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns()}"
        not_kept = ""
        if max_bytes is not None and size > max_bytes:
            not_kept = f"{size} bytes exceed the quarantine limit of {max_bytes} per object"
        elif shutil.disk_usage(self.quarantine_dir).free - size < min_free_bytes:
            not_kept = f"the disk would have less than {min_free_bytes} bytes free after them"
        else:
            try:
                atomic_write(self.quarantine_dir / f"{name}.dcm", chunks)
            except OSError as exc:  # e.g. the disk filled meanwhile; atomic_write left nothing
                not_kept = f"writing the bytes failed: {exc.strerror or type(exc).__name__}"
        shown = f"0x{status:04X}" if isinstance(status, int) else status
        info: dict[str, object] = {
            "reason": reason,
            "status": shown,
            "stage": stage,
            "received_at": time.time(),
            "size": size,
            "kept": not not_kept,
        }
        if not_kept:
            info["not_kept"] = not_kept
            log.warning("a refused object's %d bytes are not quarantined: %s", size, not_kept)
        atomic_write(self.quarantine_dir / f"{name}.json", [json.dumps(info, indent=1).encode()])
        return Quarantined(name, not not_kept, not_kept)
