"""The outbox delivers to several destinations and several reports to one destination at once,
within its bounds, several reports per association, and keeps its guarantees while doing so.

The receivers are real Storage SCPs: pynetdicom's, in this process, where a test must see how
many associations are open at once (a real SCP over real loopback associations, not a mock: the
handlers only count and, to make overlap observable without timing, hold a C-STORE response
until the expected associations are open), and dcmtk's storescp where only arrival matters.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from nidaan.core.config import Config, Peer
from nidaan.pacs_bridge.outbox import Outbox
from nidaan.pacs_bridge.state import OutboxItem, StateStore

from conftest import make_config
from factory import sample_file, with_new_uids
from peers import StoreSCP, free_port, wait_until

#: How long an SCP holds a response waiting for the associations a test expects: shorter than
#: the SCU's DIMSE time-out (make_config: 5 s), so a serial outbox fails the test's assertions
#: rather than timing out.
HOLD_S = 3.0


class Scp:
    """pynetdicom's Storage SCP on a free loopback port, counting associations.

    ``hold(scp, sop_instance_uid)`` runs in each C-STORE handler before it answers;
    ``status_of(sop_instance_uid)`` chooses the answer (0x0000 unless told otherwise).
    """

    def __init__(
        self,
        ae_title: str,
        *,
        hold: Callable[[Scp, str], None] = lambda scp, uid: None,
        status_of: Callable[[str], int] = lambda uid: 0x0000,
        counter: OpenCounter | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.hold, self.status_of = hold, status_of
        self.counter = counter or OpenCounter()
        self.lock = threading.Lock()
        self.open: set[int] = set()
        self.max_open = 0
        self.associations = 0  # established, in all
        self.released = 0
        self.aborted = 0
        self.stored: dict[str, int] = {}  # SOP Instance UID -> the association it came on
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        handlers = [
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_RELEASED, self._released),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_C_STORE, self._store),
        ]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self.server.server_address[1])

    def peer(self) -> Peer:
        return Peer(self.ae_title, "127.0.0.1", self.port)

    def _established(self, event: evt.Event) -> None:
        with self.lock:
            self.open.add(id(event.assoc))
            self.associations += 1
            self.max_open = max(self.max_open, len(self.open))
        self.counter.opened()

    def _ended(self, event: evt.Event) -> bool:
        with self.lock:
            if id(event.assoc) not in self.open:
                return False
            self.open.discard(id(event.assoc))
        self.counter.closed()
        return True

    def _released(self, event: evt.Event) -> None:
        if self._ended(event):
            with self.lock:
                self.released += 1

    def _aborted(self, event: evt.Event) -> None:
        if self._ended(event):
            with self.lock:
                self.aborted += 1

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.hold(self, uid)
        status = self.status_of(uid)
        if status == 0x0000:
            with self.lock:
                self.stored[uid] = id(event.assoc)
        return status

    def stop(self) -> None:
        self.server.shutdown()


class OpenCounter:
    """Associations open at once across several SCPs; ``reached`` is set at ``target``."""

    def __init__(self, target: int = 0) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.reached = threading.Event()

    def opened(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            if self.target and self.now >= self.target:
                self.reached.set()

    def closed(self) -> None:
        with self.lock:
            self.now -= 1


def until_reached(counter: OpenCounter) -> Callable[[Scp, str], None]:
    """A hold that answers once ``counter`` has seen its target open at once (or after HOLD_S:
    then the test's assertions on the counts fail)."""

    def hold(scp: Scp, uid: str) -> None:
        counter.reached.wait(HOLD_S)

    return hold


class Recorder:
    """The outbox's callbacks, recorded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: list[tuple[int, int, bool, str]] = []  # id, attempt number, ok, error
        self.studies: list[str] = []

    def on_attempt(self, item: OutboxItem, ok: bool, error: str) -> None:
        with self.lock:
            self.attempts.append((item.id, item.attempts + 1, ok, error))

    def on_delivered(self, study_uid: str) -> None:
        with self.lock:
            self.studies.append(study_uid)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "state.sqlite3")
    yield s
    s.close()


@pytest.fixture
def run_outbox(state: StateStore) -> Iterator[Callable[[Config, Recorder], Outbox]]:
    started: list[Outbox] = []

    def _start(cfg: Config, rec: Recorder) -> Outbox:
        box = Outbox(cfg, state, on_delivered=rec.on_delivered, on_attempt=rec.on_attempt)
        box.start()
        started.append(box)
        return box

    yield _start
    for box in started:
        box.stop()


def queue_reports(
    state: StateStore, folder: Path, destination: str, n: int, study_uid: str | None = None
) -> list[pydicom.Dataset]:
    """``n`` real SR files (pydicom's Comprehensive SR, new UIDs) queued for ``destination``;
    each in a study of its own unless ``study_uid`` is given."""
    out = []
    for _ in range(n):
        path = with_new_uids(sample_file("test-SR.dcm"), folder / f"{generate_uid()}.dcm")
        ds = pydicom.dcmread(path)
        if study_uid is not None:
            ds.StudyInstanceUID = study_uid
            ds.save_as(path, enforce_file_format=True)
        state.enqueue(ds.StudyInstanceUID, path, ds.SOPInstanceUID, destination)
        out.append(ds)
    return out


def config(tmp_path: Path, peers: list[Peer], per_peer: int, total: int) -> Config:
    cfg = make_config(tmp_path, peers=peers, retry_initial_s=0.1, retry_max_s=0.2)
    cfg.reports.max_associations_per_peer = per_peer
    cfg.reports.max_associations = total
    cfg.validate()
    return cfg


def senders_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nidaan-send-")]


def test_reports_to_one_peer_go_on_several_associations_at_once_up_to_the_bound(
    tmp_path: Path, state: StateStore, run_outbox: Callable[[Config, Recorder], Outbox]
) -> None:
    counter = OpenCounter(target=2)
    pacs = Scp("PACS", hold=until_reached(counter), counter=counter)
    try:
        reports = queue_reports(state, tmp_path / "reports", "PACS", 6)
        rec = Recorder()
        run_outbox(config(tmp_path, [pacs.peer()], per_peer=2, total=8), rec)
        wait_until(lambda: len(state.outbox("delivered")) == 6, 60, "six deliveries")
        assert set(pacs.stored) == {ds.SOPInstanceUID for ds in reports}
        # Two at once (a serial outbox has one), never more than the bound, and the six reports
        # shared those two associations rather than opening one each.
        assert pacs.max_open == 2
        assert pacs.associations == 2 and len(set(pacs.stored.values())) == 2
        wait_until(lambda: pacs.released == 2, 30, "both associations released")
        assert pacs.aborted == 0
        # One on_attempt per attempt, and each report's study (its only report) delivered once.
        assert sorted(a[2] for a in rec.attempts) == [True] * 6
        assert sorted(rec.studies) == sorted(ds.StudyInstanceUID for ds in reports)
    finally:
        pacs.stop()


def test_several_destinations_at_once_within_the_total_bound(
    tmp_path: Path, state: StateStore, run_outbox: Callable[[Config, Recorder], Outbox]
) -> None:
    counter = OpenCounter(target=3)
    a = Scp("PACS", hold=until_reached(counter), counter=counter)
    b = Scp("ARCHIVE", hold=until_reached(counter), counter=counter)
    try:
        to_a = queue_reports(state, tmp_path / "a", "PACS", 4)
        to_b = queue_reports(state, tmp_path / "b", "ARCHIVE", 4)
        run_outbox(config(tmp_path, [a.peer(), b.peer()], per_peer=2, total=3), Recorder())
        wait_until(lambda: len(state.outbox("delivered")) == 8, 60, "eight deliveries")
        assert set(a.stored) == {ds.SOPInstanceUID for ds in to_a}
        assert set(b.stored) == {ds.SOPInstanceUID for ds in to_b}
        # Three open at once needs both destinations at once (at most two each); never four.
        assert counter.most == 3
        assert a.max_open <= 2 and b.max_open <= 2
    finally:
        a.stop()
        b.stop()


def test_a_hung_destination_does_not_delay_another(
    tmp_path: Path, state: StateStore, run_outbox: Callable[[Config, Recorder], Outbox]
) -> None:
    # Both are dcmtk's storescp; the hung one is stopped with SIGSTOP after it listens, so its
    # kernel still accepts the TCP connection but nothing answers the association request: a
    # PACS that hangs, the worst case for a serial outbox (it waits out the ACSE time-out).
    hung = StoreSCP(free_port(), tmp_path / "hung", aet="HUNG")
    up = StoreSCP(free_port(), tmp_path / "up", aet="PACS")
    hung.start()
    up.start()
    assert hung.process is not None
    os.kill(hung.process.pid, signal.SIGSTOP)
    try:
        # The hung destination's report is first in the queue.
        (late,) = queue_reports(state, tmp_path / "r1", "HUNG", 1)
        (ds,) = queue_reports(state, tmp_path / "r2", "PACS", 1)
        cfg = config(
            tmp_path,
            [Peer("HUNG", "127.0.0.1", hung.port), Peer("PACS", "127.0.0.1", up.port)],
            per_peer=2,
            total=8,
        )
        cfg.dicom.network_timeout_s = 30.0  # longer than the waits below
        run_outbox(cfg, Recorder())
        (report,) = up.wait_reports(1, timeout=20)
        assert pydicom.dcmread(report).SOPInstanceUID == ds.SOPInstanceUID
        wait_until(lambda: state.outbox("delivered"), 20, "the delivery to be recorded")
        # ...while the hung destination's first attempt has not even ended.
        (waiting,) = state.outbox("queued")
        assert waiting.sop_instance_uid == late.SOPInstanceUID and waiting.attempts == 0
        # Once it answers again, its report arrives too: it was only delayed.
        os.kill(hung.process.pid, signal.SIGCONT)
        (report,) = hung.wait_reports(1, timeout=40)
        assert pydicom.dcmread(report).SOPInstanceUID == late.SOPInstanceUID
        wait_until(lambda: len(state.outbox("delivered")) == 2, 20, "both deliveries recorded")
    finally:
        if hung.process is not None:
            os.kill(hung.process.pid, signal.SIGCONT)
        hung.stop()
        up.stop()


def test_a_refused_report_does_not_hold_back_the_others_on_its_association(
    tmp_path: Path, state: StateStore, run_outbox: Callable[[Config, Recorder], Outbox]
) -> None:
    refuse: set[str] = set()
    pacs = Scp("PACS", status_of=lambda uid: 0xA700 if uid in refuse else 0x0000)
    try:
        study = generate_uid()
        first, bad, last = queue_reports(state, tmp_path / "r", "PACS", 3, study_uid=study)
        refuse.add(bad.SOPInstanceUID)  # 0xA700: out of resources (PS3.4 B.2.3)
        cfg = config(tmp_path, [pacs.peer()], per_peer=1, total=8)
        cfg.reports.max_attempts = 2
        rec = Recorder()
        box = run_outbox(cfg, rec)
        (dead,) = wait_until(lambda: state.outbox("dead"), 30, "a dead letter")
        # The other two went on the same association as the refused one's first attempt.
        assert set(pacs.stored) == {first.SOPInstanceUID, last.SOPInstanceUID}
        assert pacs.associations <= 2  # one, plus one for the retry of the refused report
        assert len(set(pacs.stored.values())) == 1
        assert dead.sop_instance_uid == bad.SOPInstanceUID and dead.attempts == 2
        assert "0xA700" in dead.last_error
        # One on_attempt per attempt: two good, two refusals of the same report numbered 1, 2.
        refusals = [(n, e) for i, n, ok, e in rec.attempts if not ok]
        assert [n for n, _ in refusals] == [1, 2] and all("0xA700" in e for _, e in refusals)
        assert sum(1 for _, _, ok, _ in rec.attempts if ok) == 2
        assert rec.studies == []  # the study is not delivered while one of its reports is not
        # Re-sent while the outbox runs (what `nidaan outbox --resend` does), and now accepted.
        refuse.clear()
        assert state.resend() == 1
        box.wake()
        wait_until(lambda: rec.studies, 30, "the study to be delivered")
        assert rec.studies == [study] and bad.SOPInstanceUID in pacs.stored
    finally:
        pacs.stop()


def test_stop_finishes_the_store_in_flight_and_leaves_the_rest_queued(
    tmp_path: Path, state: StateStore
) -> None:
    go, held = threading.Event(), threading.Event()

    def hold_first(scp: Scp, uid: str) -> None:
        held.set()
        go.wait(4.0)  # under the SCU's 5 s DIMSE time-out: answered, not timed out

    pacs = Scp("PACS", hold=hold_first)
    try:
        queue_reports(state, tmp_path / "r", "PACS", 4)
        box = Outbox(config(tmp_path, [pacs.peer()], per_peer=1, total=8), state)
        box.start()
        assert held.wait(30), "the first C-STORE never arrived"
        stopping = threading.Thread(target=box.stop)
        stopping.start()
        wait_until(lambda: not box.thread.is_alive(), 30, "the dispatcher to stop")
        go.set()
        stopping.join(30)
        assert not stopping.is_alive() and not box.thread.is_alive() and senders_alive() == []
        # The C-STORE in flight was answered and recorded; the association was released, not
        # aborted; the three not sent are still queued, no attempt counted against them.
        assert len(pacs.stored) == 1 and len(state.outbox("delivered")) == 1
        assert [i.attempts for i in state.outbox("queued")] == [0, 0, 0]
        wait_until(lambda: pacs.released == 1, 30, "the association to be released")
        assert pacs.aborted == 0
    finally:
        pacs.stop()


def test_a_delivery_that_cannot_be_recorded_is_sent_again_once_it_can(
    tmp_path: Path,
    state: StateStore,
    run_outbox: Callable[[Config, Recorder], Outbox],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A real fault, no test double: another connection holds the state database's write lock,
    # so recording the delivery fails ("database is locked", after SQLite's 5 s busy time-out).
    blocker = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None)
    pacs = Scp("PACS")
    try:
        (ds,) = queue_reports(state, tmp_path / "r", "PACS", 1)
        blocker.execute("BEGIN IMMEDIATE")
        rec = Recorder()
        box = run_outbox(config(tmp_path, [pacs.peer()], per_peer=2, total=8), rec)
        wait_until(lambda: ds.SOPInstanceUID in pacs.stored, 30, "the C-STORE")
        wait_until(
            lambda: any("recording the attempt failed" in r.getMessage() for r in caplog.records),
            30,
            "the failure to record it",
        )
        assert state.outbox("queued")  # not lost, and not marked delivered
        blocker.execute("ROLLBACK")
        wait_until(lambda: rec.studies, 30, "the study to be delivered")
        assert rec.studies == [ds.StudyInstanceUID] and state.outbox("queued") == []
        assert box.thread.is_alive()
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "nidaan.outbox")
        assert "OperationalError" in logged and "database is locked" not in logged
    finally:
        blocker.close()
        pacs.stop()
