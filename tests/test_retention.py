"""Storage lifecycle (pacs_bridge/retention.py) on a real data dir: a real spool, state database
and audit log, studies in every state, a small quota."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from nidaan.core.config import RetentionConfig
from nidaan.pacs_bridge.audit import AuditLog
from nidaan.pacs_bridge.retention import Sweeper
from nidaan.pacs_bridge.spool import Spool
from nidaan.pacs_bridge.state import InstanceRecord, StateStore

KB = 1024
DAY = 86400.0


class Node:
    """A data dir with studies made directly through the stores the server uses."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.spool = Spool(data)
        self.state = StateStore(data / "state.sqlite3")
        self.audit = AuditLog(data / "audit.jsonl")
        self._age = 0

    def study(self, state: str, *, delivery: str | None = None, size: int = 100 * KB) -> str:
        """A study of one ``size``-byte instance in ``state``, with a report whose delivery is
        ``delivery`` (queued, delivered, dead) or no report; each one older than the next."""
        study = generate_uid()
        sop = generate_uid()
        path = self.spool.store(study, sop, [os.urandom(size)])
        rec = InstanceRecord(sop, study, generate_uid(), "1.2.840.10008.5.1.4.1.1.1", path, True)
        self.state.add_instance(rec, "PACS")
        if delivery is not None:
            report_uid = generate_uid()
            report = self.spool.reports_dir / f"{report_uid}.dcm"
            report.write_bytes(os.urandom(10 * KB))
            self.state.record_report(study, report, report_uid)
            self.state.enqueue(study, report, report_uid, "PACS")
            db = sqlite3.connect(self.data / "state.sqlite3")
            db.execute("UPDATE outbox SET state = ? WHERE study_uid = ?", (delivery, study))
            db.commit()
            db.close()
        self.state.set_study_state(study, state)
        # Ages in creation order: the first study made is the oldest (10 days, 9 days, ...).
        db = sqlite3.connect(self.data / "state.sqlite3")
        db.execute(
            "UPDATE studies SET updated_at = ? WHERE study_uid = ?",
            (time.time() - (10 - self._age) * DAY, study),
        )
        db.commit()
        db.close()
        self._age += 1
        return study

    def has_spool(self, study: str) -> bool:
        return (self.spool.root / study).is_dir() and bool(self.state.instances(study))

    def pruned(self) -> list[dict]:
        """The audit log's "pruned" events, rotated files first."""
        files = [*sorted(self.data.glob("audit-*.jsonl")), self.data / "audit.jsonl"]
        lines = [line for f in files if f.exists() for line in f.read_text().splitlines()]
        return [e for e in map(json.loads, lines) if e["event"] == "pruned"]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path / "data")


def test_over_quota_the_oldest_delivered_studies_go_first_and_undelivered_ones_stay(
    node: Node,
) -> None:
    waiting = node.study("reported", delivery="queued")  # the oldest of all, not delivered
    dead = node.study("reported", delivery="dead")  # a dead letter waits for --resend
    receiving = node.study("receiving")
    delivered = [node.study("delivered", delivery="delivered") for _ in range(4)]
    # Seven studies of 100 KiB; a quota of 500 KiB: the two oldest delivered ones must go.
    config = RetentionConfig(spool_days=0, spool_max_gb=500 * KB / (1 << 30), reports_days=0)
    result = Sweeper(config, node.spool, node.state, node.audit).sweep()
    assert [node.has_spool(s) for s in delivered] == [False, False, True, True]
    assert node.has_spool(waiting) and node.has_spool(dead) and node.has_spool(receiving)
    assert result.studies_pruned == 2 and result.removed_files["spool"] == 2
    assert result.sizes["spool"] <= 500 * KB
    pruned = node.pruned()
    assert [(e["area"], e["study"]) for e in pruned] == [("spool", s) for s in delivered[:2]]
    assert all(e["bytes"] == 100 * KB and "spool_max_gb" in e["why"] for e in pruned)
    # The state still knows the study (and its delivered report), only not its instances.
    assert node.state.study(delivered[0])[0] == "delivered"  # type: ignore[index]
    assert node.state.instance_count(delivered[0]) == 0


def test_by_age_every_finished_study_goes_and_its_reports_after_their_own_age(
    node: Node,
) -> None:
    waiting = node.study("analysed")
    skipped = node.study("skipped")
    failed = node.study("failed")
    delivered = node.study("delivered", delivery="delivered")
    young = node.study("delivered", delivery="delivered")  # 6 days old: younger than 7
    reports = node.state.report_files(delivered)
    assert reports and all(p.is_file() for p in reports)
    config = RetentionConfig(spool_days=7, reports_days=8)
    Sweeper(config, node.spool, node.state, node.audit).sweep()
    assert not any(node.has_spool(s) for s in (skipped, failed, delivered))
    assert node.has_spool(waiting) and node.has_spool(young)
    # The delivered study is 7 days old: its instances go (7), its report stays (8).
    assert all(p.is_file() for p in reports)
    later = Sweeper(config, node.spool, node.state, node.audit, clock=lambda: time.time() + DAY)
    later.sweep()
    assert not any(p.exists() for p in reports)
    assert node.state.latest_report(delivered) is None
    areas = [(e["area"], e["study"]) for e in node.pruned()]
    assert ("reports", delivered) in areas and ("spool", young) in areas
    assert node.has_spool(waiting)


def test_quarantine_and_audit_log_are_kept_within_their_settings(node: Node) -> None:
    old = node.spool.quarantine([b"x" * 1000], "bad", status=0xC000, size=1000, min_free_bytes=0)
    new = node.spool.quarantine([b"y" * 1000], "bad", status=0xC000, size=1000, min_free_bytes=0)
    for suffix in (".dcm", ".json"):
        aged = node.spool.quarantine_dir / f"{old.name}{suffix}"
        os.utime(aged, (time.time() - 40 * DAY, time.time() - 40 * DAY))
    node.audit.record("received", study="1.2.3")
    config = RetentionConfig(quarantine_days=30, audit_rotate_mb=0.00001, audit_days=30)
    result = Sweeper(config, node.spool, node.state, node.audit).sweep()
    left = sorted(p.name for p in node.spool.quarantine_dir.iterdir())
    assert left == [f"{new.name}.dcm", f"{new.name}.json"]
    assert result.removed_files["quarantine"] == 2
    # The audit log was rotated: its records are in audit-<time>.jsonl (the sweeper's own
    # "pruned" too), and the next record goes to a fresh audit.jsonl.
    (rotated,) = node.data.glob("audit-*.jsonl")
    assert '"received"' in rotated.read_text()
    assert [e["area"] for e in node.pruned()] == ["quarantine"]
    assert not (node.data / "audit.jsonl").exists()
    node.audit.record("received", study="1.2.4")
    assert '"1.2.4"' in (node.data / "audit.jsonl").read_text()
    assert '"1.2.4"' not in rotated.read_text()
    os.utime(rotated, (time.time() - 31 * DAY, time.time() - 31 * DAY))
    Sweeper(config, node.spool, node.state, node.audit).sweep()
    assert not rotated.exists()


def test_keeping_for_ever_removes_nothing(node: Node) -> None:
    studies = [node.study("delivered", delivery="delivered") for _ in range(3)]
    config = RetentionConfig(spool_days=0, reports_days=0, quarantine_days=0, audit_days=0)
    result = Sweeper(config, node.spool, node.state, node.audit).sweep()
    assert all(node.has_spool(s) for s in studies)
    assert sum(result.removed_files.values()) == 0
    assert result.sizes["spool"] == 3 * 100 * KB and result.free_bytes > 0


def test_retention_settings_are_checked() -> None:
    from nidaan.core.errors import ConfigError

    with pytest.raises(ConfigError, match="retention.spool_days"):
        RetentionConfig(spool_days=-1).validate()
    with pytest.raises(ConfigError, match="retention.interval_s"):
        RetentionConfig(interval_s=0).validate()


def test_a_study_that_receives_again_is_not_pruned(node: Node) -> None:
    """An instance arriving for a finished study reopens it: neither its old instance nor the
    new one may go until it is finished again."""
    study = node.study("delivered", delivery="delivered")
    sop = generate_uid()
    path = node.spool.store(study, sop, [b"new" * 100])
    rec = InstanceRecord(sop, study, generate_uid(), "1.2.840.10008.5.1.4.1.1.1", path, True)
    node.state.add_instance(rec, "PACS")
    config = RetentionConfig(spool_days=1, reports_days=1)
    later = Sweeper(config, node.spool, node.state, node.audit, clock=lambda: time.time() + DAY)
    later.sweep()
    assert node.state.instance_count(study) == 2 and path.is_file()
    assert node.pruned() == []


def test_the_server_sweeps_in_the_background_and_shows_its_storage(tmp_path: Path) -> None:
    """A running node: a finished study's instances leave the spool after spool_days, the
    sweep is audited, and the metrics and the status page show each area and the free space."""
    import urllib.request

    from nidaan.server.app import NidaanServer

    from conftest import make_config
    from factory import synthetic_cxr
    from netutil import c_store
    from peers import free_port, wait_until

    cfg = make_config(tmp_path)
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    cfg.retention.spool_days = 1.0 / DAY  # one second
    cfg.retention.interval_s = 0.3
    server = NidaanServer(cfg)
    server.start(http=True)

    def get(path: str) -> str:
        url = f"http://127.0.0.1:{cfg.http.port}{path}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    try:
        ds, _ = synthetic_cxr(61, rows=300, columns=300)
        (ok,) = c_store(server.scp.port, [ds])
        assert ok.Status == 0x0000
        study = str(ds.StudyInstanceUID)
        folder = cfg.storage.data_dir / "spool" / study
        wait_until(lambda: server.state.study(study)[0] == "reported", 60, "the report")  # type: ignore[index]
        assert folder.is_dir()  # kept until it is a second old and the next sweep runs
        wait_until(lambda: not folder.exists(), 30, "the study's instances to be pruned")
        metrics = get("/metrics")
        assert "nidaan_pruned_studies_total 1.0" in metrics
        assert 'nidaan_storage_bytes{area="spool"} 0.0' in metrics
        assert "nidaan_storage_free_bytes" in metrics
        status = json.loads(get("/status.json"))["storage"]
        assert status["swept"] and status["free_bytes"] > 0
        assert status["areas"]["reports"]["bytes"] > 0  # the report is kept 90 days
        page = get("/")
        assert "Storage" in page and "free on the data dir" in page
        # The report stays readable, the study known; only the instances went.
        assert server.state.latest_report(study) is not None
    finally:
        server.stop()
    audit = (cfg.storage.data_dir / "audit.jsonl").read_text()
    assert '"event": "pruned"' in audit and study in audit


def test_over_the_reports_quota_the_oldest_delivered_reports_go_and_undelivered_ones_stay(
    node: Node,
) -> None:
    waiting = node.study("reported", delivery="queued")  # the oldest, its report not delivered
    dead = node.study("reported", delivery="dead")
    delivered = [node.study("delivered", delivery="delivered") for _ in range(4)]
    files = {s: node.state.report_files(s) for s in [waiting, dead, *delivered]}
    # Six reports of 10 KiB; a quota of 35 KiB: the oldest delivered ones go until it fits,
    # and neither the queued nor the dead-lettered report goes although they are older.
    config = RetentionConfig(spool_days=0, reports_days=0, reports_max_gb=35 * KB / (1 << 30))
    result = Sweeper(config, node.spool, node.state, node.audit).sweep()
    assert [all(p.exists() for p in files[s]) for s in delivered] == [False, False, False, True]
    assert all(p.is_file() for s in (waiting, dead) for p in files[s])
    assert result.sizes["reports"] <= 35 * KB and result.removed_files["reports"] == 3
    assert [(e["area"], e["study"]) for e in node.pruned()] == [
        ("reports", s) for s in delivered[:3]
    ]
    # The dead letter is still there to be resent; the instances were not touched.
    assert [i.study_uid for i in node.state.outbox("dead")] == [dead]
    assert all(node.has_spool(s) for s in [waiting, dead, *delivered])


def test_over_the_quarantine_quota_the_oldest_refused_objects_go_first(node: Node) -> None:
    entries = []
    for age in (5, 4, 3, 2):  # days old, the first the oldest
        q = node.spool.quarantine(
            [os.urandom(40 * KB)], "bad", status=0xC000, size=40 * KB, min_free_bytes=0
        )
        for suffix in (".dcm", ".json"):
            f = node.spool.quarantine_dir / f"{q.name}{suffix}"
            os.utime(f, (time.time() - age * DAY, time.time() - age * DAY))
        entries.append(q.name)
    # Four refused objects of 40 KiB (and their reasons); a quota of 100 KiB keeps two.
    config = RetentionConfig(quarantine_days=30, quarantine_max_gb=100 * KB / (1 << 30))
    result = Sweeper(config, node.spool, node.state, node.audit).sweep()
    left = sorted({p.stem for p in node.spool.quarantine_dir.iterdir()})
    assert left == sorted(entries[2:])
    assert result.removed_files["quarantine"] == 4 and result.sizes["quarantine"] <= 100 * KB
    pruned = node.pruned()
    assert [e["entry"] for e in pruned] == entries[:2]
    assert all("quarantine_max_gb" in e["why"] for e in pruned)


def test_the_audit_log_is_kept_within_its_total_size_oldest_rotated_files_first(
    node: Node,
) -> None:
    # Five rotated files of 30 KiB, a day apart, all younger than audit_days, and the current
    # file: a total cap of 80 KiB leaves the two newest rotated files and the current one.
    rotated = []
    for i in range(5):
        f = node.data / f"audit-2025010{i + 1}T000000.jsonl"
        f.write_text(json.dumps({"event": "received", "pad": "x" * (30 * KB - 40)}) + "\n")
        os.utime(f, (time.time() - (5 - i) * DAY, time.time() - (5 - i) * DAY))
        rotated.append(f)
    node.audit.record("received", study="1.2.3")
    config = RetentionConfig(audit_days=400, audit_max_gb=80 * KB / (1 << 30))
    result = Sweeper(config, node.spool, node.state, node.audit).sweep()
    assert [f.exists() for f in rotated] == [False, False, False, True, True]
    assert result.removed_files["audit"] == 3 and result.sizes["audit"] <= 80 * KB + 4 * KB
    pruned = node.pruned()
    assert [e["entry"] for e in pruned] == [f.name for f in rotated[:3]]
    assert all("audit_max_gb" in e["why"] for e in pruned)
    assert '"1.2.3"' in (node.data / "audit.jsonl").read_text()  # the current file stays


def test_audit_max_gb_is_checked() -> None:
    from nidaan.core.errors import ConfigError

    with pytest.raises(ConfigError, match="retention.audit_max_gb"):
        RetentionConfig(audit_max_gb=-1).validate()


def test_a_study_reported_again_while_its_old_report_is_pruned_keeps_its_new_delivery(
    node: Node,
) -> None:
    """Another writer (a receiving process, the pipeline) reports the study again while the
    sweeper is deleting its old result files: it waits for the sweeper's transaction, and its
    new report and outbox row survive it."""
    import threading

    study = node.study("delivered", delivery="delivered")
    (old,) = node.state.report_files(study)
    other = StateStore(node.data / "state.sqlite3")  # its own connection, as another process
    new_uid = generate_uid()
    new = node.spool.reports_dir / f"{new_uid}.dcm"
    new.write_bytes(b"new report")

    def report_again() -> None:
        other.record_report(study, new, new_uid)
        other.enqueue(study, new, new_uid, "PACS")
        other.set_study_state(study, "reported")

    writers = []

    class Racing(Sweeper):
        def _unlink(self, path: Path) -> int | None:
            writer = threading.Thread(target=report_again)
            writer.start()
            writer.join(1.0)  # it finishes now unless the sweeper holds the state
            writers.append(writer)
            return super()._unlink(path)

    config = RetentionConfig(spool_days=0, reports_days=1)
    Racing(config, node.spool, node.state, node.audit).sweep()
    assert len(writers) == 1
    writers[0].join(10)
    assert not old.exists() and new.is_file()
    queued = node.state.outbox("queued")
    assert [(i.study_uid, i.sop_instance_uid) for i in queued] == [(study, new_uid)]
    assert node.state.latest_report(study) is not None
    other.close()
