"""The spool and the state database: what a restart relies on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from nidaan.pacs_bridge.outbox import backoff
from nidaan.pacs_bridge.spool import Spool
from nidaan.pacs_bridge.state import InstanceRecord, StateStore


def _rec(spool: Spool, study: str, sop: str, image: bool = True) -> InstanceRecord:
    path = spool.store(study, sop, [b"x" * 10])
    return InstanceRecord(sop, study, "1.2.3.1", "1.2.840.10008.5.1.4.1.1.1", path, image)


def test_state_survives_reopening_and_duplicates_are_not_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "state.sqlite3")
    assert state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")
    assert not state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")  # re-sent
    state.set_study_state("1.2.3", "complete")
    state.close()
    again = StateStore(tmp_path / "state.sqlite3")
    assert [r.sop_instance_uid for r in again.instances("1.2.3")] == ["1.2.3.4"]
    assert again.studies_in("complete") == ["1.2.3"]
    assert again.study("1.2.3") == ("complete", "", "PACS")


def test_new_instance_reopens_a_finished_study(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")
    state.set_study_state("1.2.3", "delivered")
    state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")  # duplicate: no change
    assert state.study("1.2.3")[0] == "delivered"  # type: ignore[index]
    state.add_instance(_rec(spool, "1.2.3", "1.2.3.5"), "PACS")
    assert state.study("1.2.3")[0] == "receiving"  # type: ignore[index]


def test_instance_count_follows_new_duplicate_and_pruned_instances(tmp_path: Path) -> None:
    """The count the per-study cap and GetStudy read: new instances only, per study, back to
    zero when the spool is pruned, and counting again when the study is sent again."""
    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    for sop in ("1.2.3.4", "1.2.3.5", "1.2.3.4"):  # the third is a re-send
        state.add_instance(_rec(spool, "1.2.3", sop), "PACS")
    state.add_instance(_rec(spool, "1.2.9", "1.2.9.1"), "PACS")
    assert state.instance_count("1.2.3") == 2 == len(state.instances("1.2.3"))
    assert state.instance_count("1.2.9") == 1
    assert state.instance_count("1.2.404") == 0
    state.set_study_state("1.2.3", "delivered")
    files = state.prune("1.2.3", "spool", lambda paths: None)
    assert files is not None and len(files) == 2
    assert state.instance_count("1.2.3") == 0 and state.instance_count("1.2.9") == 1
    state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")  # sent again after pruning
    assert state.instance_count("1.2.3") == 1 == len(state.instances("1.2.3"))


def test_a_database_from_before_the_instance_count_is_counted_on_opening(tmp_path: Path) -> None:
    import sqlite3

    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    for sop in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
        state.add_instance(_rec(spool, "1.2.3", sop), "PACS")
    state.add_instance(_rec(spool, "1.2.9", "1.2.9.1"), "PACS")
    state.close()
    old = sqlite3.connect(tmp_path / "s.db")  # the schema of the releases before the column
    old.execute("ALTER TABLE studies DROP COLUMN instance_count")
    old.commit()
    old.close()
    again = StateStore(tmp_path / "s.db")
    assert again.instance_count("1.2.3") == 3 and again.instance_count("1.2.9") == 1
    again.add_instance(_rec(spool, "1.2.3", "1.2.3.7"), "PACS")
    assert again.instance_count("1.2.3") == 4


def test_outbox_item_is_delivered_once_per_destination(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db")
    spool = Spool(tmp_path)
    state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")
    report = tmp_path / "r.dcm"
    for _ in range(2):  # queued twice (e.g. after a restart): still one item per destination
        state.enqueue("1.2.3", report, "2.25.1", "PACS")
        state.enqueue("1.2.3", report, "2.25.1", "ARCHIVE")
    items = state.due()
    assert sorted(i.destination for i in items) == ["ARCHIVE", "PACS"]
    state.retry_later(items[0].id, when=2e12, error="connection refused")
    assert [i.destination for i in state.due()] == [items[1].destination]
    assert state.delivered(items[1].id) == ""  # the other destination still waits
    assert state.delivered(items[0].id) == "1.2.3"
    assert state.outbox("queued") == []


def test_a_study_is_reported_with_its_queue_and_report_or_not_at_all(tmp_path: Path) -> None:
    """The state, the outbox rows and the report record go in one transaction. Written apart,
    a reader could see "reported" with nothing queued (a test did), and a crash between them
    left the study reported and its report never sent."""
    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    for study in ("1.2.3", "1.2.4"):
        state.add_instance(_rec(spool, study, study + ".1"), "PACS")
        state.set_study_state(study, "analysed")
    report = tmp_path / "sr.dcm"
    state.report_study(
        "1.2.3", "", (report, "2.25.1"), [(report, "2.25.1", "PACS"), (report, "2.25.1", "B")]
    )
    assert state.study("1.2.3") == ("reported", "", "PACS")
    assert sorted(i.destination for i in state.outbox("queued")) == ["B", "PACS"]
    assert state.latest_report("1.2.3") == (report, "2.25.1")

    # A row the outbox refuses (no destination) fails it all, as a crash part-way would.
    bad = [(report, "2.25.2", "PACS"), (report, "2.25.2", None)]
    with pytest.raises(sqlite3.IntegrityError):
        state.report_study("1.2.4", "", (report, "2.25.2"), bad)  # type: ignore[arg-type]
    assert state.study("1.2.4") == ("analysed", "", "PACS")  # analysed again after a restart
    assert [i.study_uid for i in state.outbox()] == ["1.2.3", "1.2.3"]
    assert state.latest_report("1.2.4") is None


@pytest.mark.parametrize("uid", ["../../etc", "1.2.3/../../x", "1.2.03", "", "1" * 65, "a.b"])
def test_spool_refuses_uids_that_could_escape_it(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        spool.store(uid, "1.2.3", [b"x"])
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        spool.store("1.2.3", uid, [b"x"])
    assert list(spool.root.rglob("*")) == []


def test_spool_write_is_complete_or_absent(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    def chunks():  # type: ignore[no-untyped-def]
        yield b"part one"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        spool.store("1.2.3", "1.2.3.4", chunks())
    assert list(spool.root.rglob("*.dcm")) == []
    assert list(spool.root.rglob("*.tmp")) == []


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_an_instance_that_cannot_be_recorded_fails_instead_of_passing_as_a_resend(
    tmp_path: Path,
) -> None:
    """A row the schema refuses (a missing series UID) raises, so the C-STORE fails; it is not
    taken for a re-sent instance and acknowledged without a row."""
    import sqlite3

    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    rec = InstanceRecord("1.2.3.4", "1.2.3", None, "1.2.840.1", tmp_path / "x", True)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        state.add_instance(rec, "PACS")
    assert state.instance_count("1.2.3") == 0
    assert state.add_instance(_rec(spool, "1.2.3", "1.2.3.4"), "PACS")  # the real one, later


def _held_commit(state: StateStore, calls: list[InstanceRecord]) -> tuple[list, int]:
    """Run ``add_instance`` for ``calls`` from one thread each while the database is busy (its
    lock held, as during another thread's commit), then let go: what each call returned or
    raised, and how many transactions recorded them."""
    import threading
    import time

    outcomes: list = [None] * len(calls)

    def call(i: int) -> None:
        try:
            outcomes[i] = state.add_instance(calls[i], "PACS")
        except Exception as exc:
            outcomes[i] = exc

    before = state.group_commits
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    with state._lock:  # the first call takes its group and waits here; the rest queue up
        threads[0].start()
        while not state._committing:
            time.sleep(0.001)
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while len(state._pending) < len(calls) - 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    for t in threads:
        t.join(30)
    return outcomes, state.group_commits - before


def test_concurrent_instances_share_one_commit_and_each_is_recorded(tmp_path: Path) -> None:
    """Associations storing at once: the instances that arrive during a commit are recorded
    by the next one together, each told whether it was new, none lost, the counts right."""
    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    calls = [_rec(spool, f"1.2.{i % 2}", f"1.2.{i % 2}.{i}") for i in range(8)]
    calls.append(_rec(spool, "1.2.1", "1.2.1.1"))  # a re-send, in the same group as the first
    outcomes, commits = _held_commit(state, calls)
    assert outcomes == [True] * 8 + [False]
    assert commits == 2  # the first call's, then one for the eight that waited
    assert state.instance_count("1.2.0") == 4 and state.instance_count("1.2.1") == 4
    state.close()
    again = StateStore(tmp_path / "s.db")  # committed, not only seen by this connection
    assert sorted(r.sop_instance_uid for r in again.instances("1.2.1")) == [
        f"1.2.1.{i}" for i in (1, 3, 5, 7)
    ]


def test_a_row_that_fails_in_a_group_fails_alone(tmp_path: Path) -> None:
    import sqlite3

    spool = Spool(tmp_path)
    state = StateStore(tmp_path / "s.db")
    calls = [_rec(spool, "1.2.3", f"1.2.3.{i}") for i in range(5)]
    # A value SQLite cannot take: its statement fails, and with it the group's transaction.
    bad = InstanceRecord("1.2.3.99", "1.2.3", ["1.2.3.1"], "1.2.840.1", tmp_path / "x", True)  # type: ignore[arg-type]
    calls.insert(3, bad)
    outcomes, commits = _held_commit(state, calls)
    assert isinstance(outcomes[3], sqlite3.Error)
    assert commits == 1 + 4  # the first call's; then the group of the other five failed and
    # was retried call by call: four committed, the bad one alone failed
    assert outcomes[:3] + outcomes[4:] == [True] * 5
    assert state.instance_count("1.2.3") == 5
    assert state.study_of("1.2.3.99") is None
    assert state.add_instance(_rec(spool, "1.2.3", "1.2.3.100"), "PACS")  # and it goes on
