"""Study and delivery state in SQLite (WAL), one database per Nidaan instance.

A study moves through::

    receiving -> complete -> analysed -> reported -> delivered
    complete -> skipped   (nothing to analyse: no images, or no model applies)
    any state -> failed   (with a reason)

Every acknowledged instance has a row in ``instances`` before the C-STORE response is sent, so
after a restart the server knows what it still owes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
-- instance_count: the study's rows in instances, kept with them. The per-study cap reads it on
-- every C-STORE, and COUNT(*) over the index grows with the study (0.4 ms at 10,000 instances).
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    is_image INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    report_path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (sop_instance_uid, destination)
);
CREATE TABLE IF NOT EXISTS reports (
    study_uid TEXT PRIMARY KEY,
    report_path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    updated_at REAL NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    images INTEGER NOT NULL DEFAULT -1
);
-- Drift: one row per analysed image, model and finding (the image by a digest of its SOP
-- Instance UID, so that an image analysed again counts once); kept two days.
CREATE TABLE IF NOT EXISTS analysed_findings (
    image TEXT NOT NULL,
    model TEXT NOT NULL,
    finding TEXT NOT NULL,
    modality TEXT NOT NULL,
    present INTEGER NOT NULL,
    probability REAL NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (image, model, finding)
);
CREATE INDEX IF NOT EXISTS analysed_findings_by_time ON analysed_findings(recorded_at);
-- A radiologist's verdict on one finding of a report (gRPC RecordFeedback, or a verified SR
-- whose SOP Instance UID is source_uid; NULL for gRPC, so that calls never collide).
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    report_uid TEXT NOT NULL,
    tracking_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    finding TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reader TEXT NOT NULL DEFAULT '',
    comment TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    source_uid TEXT,
    recorded_at REAL NOT NULL,
    UNIQUE (source_uid, tracking_uid, model, finding)
);
CREATE INDEX IF NOT EXISTS feedback_by_study ON feedback(study_uid);
"""

STUDY_STATES = ("receiving", "complete", "analysed", "reported", "delivered", "skipped", "failed")


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    path: Path
    is_image: bool


@dataclass
class _Pending:
    """One :meth:`StateStore.add_instance` call waiting for the commit that records it."""

    record: InstanceRecord
    calling_ae: str
    done: bool = False
    recorded: bool = False
    is_new: bool = False
    error: Exception | None = None


@dataclass(frozen=True)
class OutboxItem:
    """A report waiting for (or done with) delivery to one destination."""

    id: int
    study_uid: str
    report_path: Path
    sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str


@dataclass(frozen=True)
class FeedbackRecord:
    """A radiologist's verdict on one finding of one of Nidaan's reports."""

    study_uid: str
    #: The report's SOP Instance UID.
    report_uid: str
    #: The finding's Tracking Unique Identifier ('' when the verdict named model and finding).
    tracking_uid: str
    model: str
    finding: str
    #: 'agree' or 'disagree'.
    verdict: str
    #: A keyed digest of the reader's identity, never the identity itself ('' when not given).
    reader: str = ""
    comment: str = ""
    #: 'grpc' or 'sr'.
    source: str = "grpc"
    #: The feedback SR's SOP Instance UID (None for gRPC).
    source_uid: str | None = None
    recorded_at: float = 0.0


@dataclass(frozen=True)
class StudyRow:
    """What the status page shows of one study (no patient data)."""

    study_uid: str
    calling_ae: str
    state: str
    reason: str
    updated_at: float
    received_at: float | None
    instances: int
    sop_classes: tuple[str, ...]
    summary: str
    queued: int
    delivered: int
    dead: int


class StateStore:
    """Thread-safe access to the state database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # add_instance's group commit: the calls waiting, and whether one is committing.
        self._group = threading.Condition()
        self._pending: list[_Pending] = []
        self._committing = False
        #: Transactions that recorded instances (fewer than the instances under concurrency).
        self.group_commits = 0
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed row survives power loss, as the C-STORE response promises.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(reports)")}
        if "summary" not in columns:  # a reports table from before the summary was kept
            self._db.execute("ALTER TABLE reports ADD COLUMN summary TEXT NOT NULL DEFAULT ''")
        if "images" not in columns:  # nor how many images it covered
            self._db.execute("ALTER TABLE reports ADD COLUMN images INTEGER NOT NULL DEFAULT -1")
        self._add_instance_counts()

    def _add_instance_counts(self) -> None:
        """A studies table from before ``instance_count``: add it, counted from ``instances``,
        in one write transaction, so a receiving process that opens the database at the same
        moment finds the column whole or adds it itself. A table that has it (every open but
        the first) takes no write lock."""
        if "instance_count" in {r[1] for r in self._db.execute("PRAGMA table_info(studies)")}:
            return
        with self._tx() as db:
            if "instance_count" in {r[1] for r in db.execute("PRAGMA table_info(studies)")}:
                return
            db.execute("ALTER TABLE studies ADD COLUMN instance_count INTEGER NOT NULL DEFAULT 0")
            db.execute(
                "UPDATE studies SET instance_count ="
                " (SELECT COUNT(*) FROM instances i WHERE i.study_uid = studies.study_uid)"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (its fsync, a full disk) leaves the transaction open:
                # roll it back too, or every later BEGIN on this connection would fail.
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    # --- instances and studies -----------------------------------------------------------------

    def add_instance(self, rec: InstanceRecord, calling_ae: str) -> bool:
        """Record a stored instance; False when that SOP Instance UID was already stored.
        It returns once the row is committed (fsync'd): the C-STORE response may then say
        Success.

        A new instance of a study that was already analysed reopens it, so the report covers it.

        Group commit: the calls that arrive while a commit is under way (other associations of
        this process) are recorded together in the next transaction, one WAL fsync for all of
        them, instead of queueing for one commit each. A transaction that fails is retried one
        call at a time, so one call's error is never another's.
        """
        me = _Pending(rec, calling_ae)
        with self._group:
            self._pending.append(me)
            while self._committing and not me.done:
                self._group.wait()
            leader = not me.done
            if leader:  # no commit under way: this call commits everything waiting
                batch, self._pending = self._pending, []
                self._committing = True
        if leader:
            try:
                self._record_group(batch)
            finally:
                with self._group:
                    for p in batch:
                        if not p.recorded and p.error is None:  # the leader was interrupted
                            p.error = sqlite3.OperationalError("the commit was interrupted")
                        p.done = True
                    self._committing = False
                    self._group.notify_all()
        if me.error is not None:
            raise me.error
        return me.is_new

    def _record_group(self, batch: list[_Pending]) -> None:
        """Record ``batch`` in one transaction, or each call in its own if that fails."""
        try:
            with self._tx() as db:
                news = [self._insert_instance(db, p.record, p.calling_ae) for p in batch]
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
        else:
            for p, is_new in zip(batch, news, strict=True):
                p.is_new, p.recorded = is_new, True
            self.group_commits += 1
            return
        for p in batch:  # the group failed: find whose row it was
            try:
                with self._tx() as db:
                    p.is_new = self._insert_instance(db, p.record, p.calling_ae)
                p.recorded = True
                self.group_commits += 1
            except Exception as exc:
                p.error = exc

    @staticmethod
    def _insert_instance(db: sqlite3.Connection, rec: InstanceRecord, calling_ae: str) -> bool:
        """The rows of one stored instance, in the caller's transaction; whether it is new."""
        now = time.time()
        cur = db.execute(
            # Only a re-sent SOP Instance UID is ignored. OR IGNORE would also drop a row that
            # breaks NOT NULL without an error, and the instance would be acknowledged unrecorded.
            "INSERT INTO instances VALUES (?,?,?,?,?,?,?) ON CONFLICT(sop_instance_uid) DO NOTHING",
            (
                rec.sop_instance_uid,
                rec.study_uid,
                rec.series_uid,
                rec.sop_class_uid,
                str(rec.path),
                int(rec.is_image),
                now,
            ),
        )
        is_new = cur.rowcount == 1
        db.execute(
            "INSERT INTO studies (study_uid, calling_ae, state, updated_at, instance_count)"
            " VALUES (?,?,'receiving',?,?) ON CONFLICT(study_uid) DO UPDATE SET"
            " state = CASE WHEN ? THEN 'receiving' ELSE state END,"
            " reason = CASE WHEN ? THEN '' ELSE reason END,"
            " instance_count = instance_count + excluded.instance_count,"
            " calling_ae = excluded.calling_ae, updated_at = excluded.updated_at",
            (rec.study_uid, calling_ae, now, int(is_new), is_new, is_new),
        )
        return is_new

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, study_uid, series_uid, sop_class_uid, path, is_image"
                " FROM instances WHERE study_uid = ? ORDER BY received_at",
                (study_uid,),
            ).fetchall()
        return [InstanceRecord(r[0], r[1], r[2], r[3], Path(r[4]), bool(r[5])) for r in rows]

    def study_of(self, sop_instance_uid: str) -> str | None:
        """The study an instance was stored under, or None if it was never stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT study_uid FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return None if row is None else str(row[0])

    def instance_count(self, study_uid: str) -> int:
        """How many instances of the study are stored (0 for a study never received)."""
        with self._lock:
            row = self._db.execute(
                "SELECT instance_count FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def set_study_state(self, study_uid: str, state: str, reason: str = "") -> None:
        if state not in STUDY_STATES:
            raise ValueError(f"unknown study state {state!r}")
        with self._tx() as db:
            _set_state(db, study_uid, state, reason)

    def study(self, study_uid: str) -> tuple[str, str, str] | None:
        """(state, reason, calling AE) of a study, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, reason, calling_ae FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def studies_in(self, *states: str) -> list[str]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT study_uid FROM studies WHERE state IN ({marks}) ORDER BY updated_at",
                states,
            ).fetchall()
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        """How many studies are in each state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    # --- outbox ----------------------------------------------------------------------------------

    def enqueue(
        self, study_uid: str, report_path: Path, sop_instance_uid: str, destination: str
    ) -> None:
        """Queue a report for a destination (idempotent for the same report and destination)."""
        self.enqueue_all(study_uid, [(report_path, sop_instance_uid, destination)])

    def enqueue_all(self, study_uid: str, items: Sequence[tuple[Path, str, str]]) -> None:
        """Queue a study's result objects, (path, SOP Instance UID, destination) each, in one
        transaction: the outbox never sees part of them, so the study counts as delivered only
        once all are (idempotent for the same object and destination)."""
        with self._tx() as db:
            _enqueue(db, study_uid, items)

    def study_outbox_counts(self, study_uid: str) -> dict[str, int]:
        """How many of one study's deliveries are in each state."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM outbox WHERE study_uid = ? GROUP BY state",
                (study_uid,),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def due(self, now: float | None = None) -> list[OutboxItem]:
        """Queued items whose next attempt is due."""
        now = time.time() if now is None else now
        return [i for i in self.outbox("queued") if i.next_attempt_at <= now]

    def outbox_counts(self) -> dict[str, int]:
        """How many report deliveries are in each state (queued, delivered, dead)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def outbox(self, *states: str) -> list[OutboxItem]:
        query = "SELECT * FROM outbox"
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", states).fetchall()
        return [
            OutboxItem(r[0], r[1], Path(r[2]), r[3], r[4], r[5], r[6], r[7], r[8]) for r in rows
        ]

    def delivered(self, item_id: int) -> str:
        """Mark an item delivered; return its study UID once every item of the study is."""
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = 'delivered', attempts = attempts + 1,"
                " last_error = '' WHERE id = ?",
                (item_id,),
            )
            (study_uid,) = db.execute(
                "SELECT study_uid FROM outbox WHERE id = ?", (item_id,)
            ).fetchone()
            (left,) = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE study_uid = ? AND state != 'delivered'",
                (study_uid,),
            ).fetchone()
        return study_uid if left == 0 else ""

    def retry_later(self, item_id: int, when: float, error: str, max_attempts: int = 0) -> bool:
        """Count a failed attempt; past ``max_attempts`` (if > 0) the item becomes a dead letter.

        Returns True when it did.
        """
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ? WHERE id = ?",
                (when, error[:500], item_id),
            )
            if max_attempts > 0:
                cur = db.execute(
                    "UPDATE outbox SET state = 'dead' WHERE id = ? AND attempts >= ?",
                    (item_id, max_attempts),
                )
                return cur.rowcount == 1
        return False

    def resend(self, item_ids: list[int] | None = None) -> int:
        """Queue dead letters again (all, or those ids) with a fresh attempt count."""
        query = (
            "UPDATE outbox SET state = 'queued', attempts = 0, next_attempt_at = ?"
            " WHERE state = 'dead'"
        )
        args: list[object] = [time.time()]
        if item_ids:
            query += f" AND id IN ({','.join('?' * len(item_ids))})"
            args.extend(item_ids)
        with self._tx() as db:
            return db.execute(query, args).rowcount

    # --- GetStudy (gRPC) ---

    # --- retention -------------------------------------------------------------------------------

    #: A study that needs nothing more: finished, with no delivery queued or dead (waiting
    #: for a resend).
    _PRUNABLE = (
        "s.state IN ('delivered', 'skipped', 'failed', 'reported')"
        " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid"
        " AND o.state IN ('queued', 'dead'))"
    )
    #: What each retention area holds of a study.
    _HOLDS = {
        "spool": "EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid)",
        "reports": "(EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid)"
        " OR EXISTS (SELECT 1 FROM reports r WHERE r.study_uid = s.study_uid))",
    }

    def prunable_studies(self, area: str = "spool") -> list[tuple[str, float]]:
        """(study UID, last change) of the studies that need nothing more and still hold
        something in ``area`` (``spool``: instances; ``reports``: result objects), oldest
        first. What is received or analysed, or still to go, is never here; nor is a study
        pruned already, so a sweep reads only what it may remove."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT study_uid, updated_at FROM studies s WHERE {self._PRUNABLE}"
                f" AND {self._HOLDS[area]} ORDER BY updated_at, study_uid"
            ).fetchall()
        return [(str(r[0]), float(r[1])) for r in rows]

    def is_prunable(self, study_uid: str) -> bool:
        """Whether the study needs nothing more (a look only: :meth:`prune` checks again in the
        transaction that removes)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT 1 FROM studies s WHERE s.study_uid = ? AND {self._PRUNABLE}",
                (study_uid,),
            ).fetchone()
        return row is not None

    def report_files(self, study_uid: str) -> list[Path]:
        """The study's result objects on disk (reports and region objects), each once."""
        with self._lock:
            rows = self._db.execute(
                "SELECT report_path FROM outbox WHERE study_uid = ?"
                " UNION SELECT report_path FROM reports WHERE study_uid = ?",
                (study_uid, study_uid),
            ).fetchall()
        return [p for p in (Path(r[0]) for r in rows) if p.exists()]

    def prune(
        self, study_uid: str, area: str, remove: Callable[[list[Path]], None]
    ) -> list[Path] | None:
        """Prune one study's ``area`` (``spool``: its instances; ``reports``: its result
        objects) if it still needs nothing more; the files it held, or None when it does need
        them (an instance arrived, or it was reported again, since it was listed).

        The check, ``remove(files)`` (which deletes them from disk) and forgetting their rows
        are one transaction: a study reopened or re-reported by another thread or receiving
        process waits for it and then keeps everything it adds (its new instances, its new
        outbox rows and report)."""
        with self._tx() as db:
            if not db.execute(
                f"SELECT 1 FROM studies s WHERE s.study_uid = ? AND {self._PRUNABLE}",
                (study_uid,),
            ).fetchone():
                return None
            if area == "spool":
                rows = db.execute(
                    "SELECT sop_instance_uid, path FROM instances WHERE study_uid = ?",
                    (study_uid,),
                ).fetchall()
                files = [Path(r[1]) for r in rows]
                remove(files)
                db.executemany(
                    "DELETE FROM instances WHERE study_uid = ? AND sop_instance_uid = ?",
                    [(study_uid, r[0]) for r in rows],
                )
                db.execute(
                    "UPDATE studies SET instance_count = instance_count - ? WHERE study_uid = ?",
                    (len(rows), study_uid),
                )
            else:
                rows = db.execute(
                    "SELECT report_path FROM outbox WHERE study_uid = ?"
                    " UNION SELECT report_path FROM reports WHERE study_uid = ?",
                    (study_uid, study_uid),
                ).fetchall()
                files = [Path(r[0]) for r in rows]
                remove(files)
                db.execute("DELETE FROM outbox WHERE study_uid = ?", (study_uid,))
                db.execute("DELETE FROM reports WHERE study_uid = ?", (study_uid,))
        return files

    def record_report(
        self,
        study_uid: str,
        report_path: Path,
        sop_instance_uid: str,
        summary: str = "",
        images: int = -1,
    ) -> None:
        """Remember the study's newest report (its English SR), its one-line summary of the
        findings (no patient data) and how many stored images it was made from, whether or not
        it is sent anywhere: what GetStudy, the status page and an operator read."""
        with self._tx() as db:
            _record_report(db, study_uid, report_path, sop_instance_uid, summary, images)

    def report_study(
        self,
        study_uid: str,
        reason: str,
        report: tuple[Path, str],
        queue: Sequence[tuple[Path, str, str]] = (),
        summary: str = "",
        images: int = -1,
    ) -> None:
        """Mark a study reported, remember its newest ``report`` (path, SOP Instance UID) and
        queue its result objects (as ``enqueue_all``), in one transaction.

        One transaction, because each apart is a window: a reader between them saw a reported
        study with nothing queued and no report, and a crash there left it so for good, its
        report never sent."""
        with self._tx() as db:
            _set_state(db, study_uid, "reported", reason)
            _enqueue(db, study_uid, queue)
            _record_report(db, study_uid, report[0], report[1], summary, images)

    def reported_images(self, study_uid: str) -> int:
        """How many stored images the study's newest report was made from (-1: no report, or
        one recorded before this was kept)."""
        with self._lock:
            row = self._db.execute(
                "SELECT images FROM reports WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return -1 if row is None else int(row[0])

    def nidaan_report(self, sop_instance_uid: str) -> tuple[str, Path] | None:
        """(study UID, path) of a report Nidaan made (any language's SR, recorded or queued)
        with this SOP Instance UID, or None when it made none (or it was pruned)."""
        with self._lock:
            row = self._db.execute(
                "SELECT study_uid, report_path FROM reports WHERE sop_instance_uid = ?"
                " UNION ALL SELECT study_uid, report_path FROM outbox"
                " WHERE sop_instance_uid = ? LIMIT 1",
                (sop_instance_uid, sop_instance_uid),
            ).fetchone()
        return None if row is None else (str(row[0]), Path(row[1]))

    # --- drift -----------------------------------------------------------------------------------

    #: How long analysed findings are kept (the status page shows the last day).
    FINDINGS_KEPT_S = 2 * 86400.0

    def record_findings(
        self, rows: Sequence[tuple[str, str, str, str, bool, float]]
    ) -> list[tuple[str, str, str, str, bool, float]]:
        """Record analysed findings, (image digest, model, finding, modality, present,
        probability) each; returns those not recorded before (an image analysed again within
        FINDINGS_KEPT_S counts once). Rows older than that are forgotten here."""
        now = time.time()
        new = []
        with self._tx() as db:
            db.execute(
                "DELETE FROM analysed_findings WHERE recorded_at < ?", (now - self.FINDINGS_KEPT_S,)
            )
            for row in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO analysed_findings VALUES (?,?,?,?,?,?,?)",
                    (row[0], row[1], row[2], row[3], int(row[4]), float(row[5]), now),
                )
                if cur.rowcount == 1:
                    new.append(row)
        return new

    def finding_rates(self, since: float) -> list[tuple[str, str, int, int]]:
        """(model, finding, images analysed, images where it was present) since ``since``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, finding, COUNT(*), SUM(present) FROM analysed_findings"
                " WHERE recorded_at >= ? GROUP BY model, finding ORDER BY model, finding",
                (since,),
            ).fetchall()
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3] or 0)) for r in rows]

    # --- feedback --------------------------------------------------------------------------------

    def add_feedback(self, rec: FeedbackRecord) -> bool:
        """Record a verdict; False when this SR's verdict on that finding is recorded already."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO feedback (study_uid, report_uid, tracking_uid, model,"
                " finding, verdict, reader, comment, source, source_uid, recorded_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.study_uid,
                    rec.report_uid,
                    rec.tracking_uid,
                    rec.model,
                    rec.finding,
                    rec.verdict,
                    rec.reader,
                    rec.comment,
                    rec.source,
                    rec.source_uid,
                    rec.recorded_at or time.time(),
                ),
            )
        return cur.rowcount == 1

    def feedback(self, study_uid: str = "") -> list[FeedbackRecord]:
        """The verdicts recorded (on one study's reports, or all), oldest first."""
        query = (
            "SELECT study_uid, report_uid, tracking_uid, model, finding, verdict, reader,"
            " comment, source, source_uid, recorded_at FROM feedback"
        )
        args: tuple[str, ...] = ()
        if study_uid:
            query += " WHERE study_uid = ?"
            args = (study_uid,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [FeedbackRecord(*r) for r in rows]

    def feedback_counts(self) -> list[tuple[str, str, str, int]]:
        """(model, finding, verdict, how many) over every verdict recorded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, finding, verdict, COUNT(*) FROM feedback"
                " GROUP BY model, finding, verdict ORDER BY model, finding, verdict"
            ).fetchall()
        return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    def recent_studies(
        self, limit: int = 50, *, state: str = "", calling_ae: str = ""
    ) -> list[StudyRow]:
        """The newest studies (by last change), optionally of one state or calling AE, with
        what the status page shows of each."""
        where, args = [], []
        if state:
            where.append("s.state = ?")
            args.append(state)
        if calling_ae:
            where.append("s.calling_ae = ?")
            args.append(calling_ae)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.study_uid, s.calling_ae, s.state, s.reason, s.updated_at,"
                " (SELECT MIN(received_at) FROM instances i WHERE i.study_uid = s.study_uid),"
                " s.instance_count,"
                " (SELECT GROUP_CONCAT(DISTINCT sop_class_uid) FROM instances i"
                "  WHERE i.study_uid = s.study_uid),"
                " COALESCE((SELECT summary FROM reports r WHERE r.study_uid = s.study_uid), ''),"
                " (SELECT COUNT(*) FROM outbox o WHERE o.study_uid = s.study_uid"
                "  AND o.state = 'queued'),"
                " (SELECT COUNT(*) FROM outbox o WHERE o.study_uid = s.study_uid"
                "  AND o.state = 'delivered'),"
                " (SELECT COUNT(*) FROM outbox o WHERE o.study_uid = s.study_uid"
                "  AND o.state = 'dead')"
                f" FROM studies s {clause} ORDER BY s.updated_at DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [
            StudyRow(
                study_uid=r[0],
                calling_ae=r[1],
                state=r[2],
                reason=r[3],
                updated_at=float(r[4]),
                received_at=float(r[5]) if r[5] is not None else None,
                instances=int(r[6]),
                sop_classes=tuple(sorted(set((r[7] or "").split(",")) - {""})),
                summary=r[8],
                queued=int(r[9]),
                delivered=int(r[10]),
                dead=int(r[11]),
            )
            for r in rows
        ]

    def calling_aes(self) -> list[str]:
        """Every AE title that has sent a study (the status page's filter)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT calling_ae FROM studies ORDER BY calling_ae"
            ).fetchall()
        return [r[0] for r in rows]

    def latest_report(self, study_uid: str) -> tuple[Path, str] | None:
        """(path, SOP Instance UID) of the study's newest report, or None.

        Read-only. A study analysed again gets a new report, which replaces the record. (A
        state database from before the reports table knows reports only by their deliveries.)
        """
        with self._lock:
            row = self._db.execute(
                "SELECT report_path, sop_instance_uid FROM reports WHERE study_uid = ?",
                (study_uid,),
            ).fetchone()
            if row is None:
                # The study's first queued object: its SR (the SR is queued first).
                row = self._db.execute(
                    "SELECT report_path, sop_instance_uid FROM outbox WHERE study_uid = ?"
                    " ORDER BY id LIMIT 1",
                    (study_uid,),
                ).fetchone()
        return None if row is None else (Path(row[0]), str(row[1]))


def _set_state(db: sqlite3.Connection, study_uid: str, state: str, reason: str) -> None:
    db.execute(
        "UPDATE studies SET state = ?, reason = ?, updated_at = ? WHERE study_uid = ?",
        (state, reason, time.time(), study_uid),
    )


def _enqueue(
    db: sqlite3.Connection, study_uid: str, items: Sequence[tuple[Path, str, str]]
) -> None:
    now = time.time()
    db.executemany(
        "INSERT INTO outbox (study_uid, report_path, sop_instance_uid, destination, state,"
        " next_attempt_at) VALUES (?,?,?,?,'queued',?)"
        " ON CONFLICT(sop_instance_uid, destination) DO UPDATE SET state = 'queued',"
        " report_path = excluded.report_path, next_attempt_at = excluded.next_attempt_at",
        [(study_uid, str(path), sop, dest, now) for path, sop, dest in items],
    )


def _record_report(
    db: sqlite3.Connection,
    study_uid: str,
    report_path: Path,
    sop_instance_uid: str,
    summary: str,
    images: int,
) -> None:
    db.execute(
        "INSERT INTO reports (study_uid, report_path, sop_instance_uid, updated_at,"
        " summary, images) VALUES (?,?,?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
        " report_path = excluded.report_path, summary = excluded.summary,"
        " sop_instance_uid = excluded.sop_instance_uid, updated_at = excluded.updated_at,"
        " images = excluded.images",
        (study_uid, str(report_path), sop_instance_uid, time.time(), summary, images),
    )
