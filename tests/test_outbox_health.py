"""Background threads the node depends on: the outbox outlives any exception, and /healthz on the
real HTTP port says 503, naming the thread, when an analysis worker, the timer or the outbox has
ended."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from nidaan.core.config import Config, Peer
from nidaan.server.app import NidaanServer

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store
from peers import DCMTK_ENV, StoreSCP, free_port, need, wait_for_port, wait_until


class Pacs(StoreSCP):
    """dcmtk's storescp (never pynetdicom's) as the PACS that reports go to."""

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [need("storescp"), "-aet", self.aet, "-od", str(self.folder), "+xa", str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.process)


def outbox_alive() -> bool:
    """Whether an outbox thread runs (found by name: the test must run against the old code too,
    which had no ``Outbox.thread``)."""
    return any(t.name == "nidaan-outbox" and t.is_alive() for t in threading.enumerate())


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(free_port(), tmp_path / "pacs")
    p.start()
    yield p
    p.stop()


def test_a_malformed_report_does_not_stop_delivery(
    tmp_path: Path,
    pacs: Pacs,
    start_server: Callable[[Config], NidaanServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_config(tmp_path, peers=[Peer("PACS", "127.0.0.1", pacs.port)], destinations=["PACS"])
    server = start_server(cfg)
    # A real fault, no test double: a report file in the outbox that is not DICOM. Reading it
    # raises pydicom's InvalidDicomError, which is neither a DeliveryError nor an OSError.
    bad = server.spool.reports_dir / "1.2.3.4.dcm"
    bad.write_bytes(b"DOE^JANE 123456 is not a DICOM file" * 10)
    server.state.enqueue("1.2.3", bad, "1.2.3.4", "PACS")
    server.outbox.wake()
    wait_until(
        lambda: not outbox_alive() or server.state.outbox("queued")[0].attempts,
        30,
        "the outbox to try the malformed report",
    )
    ds, _ = synthetic_cxr(71, rows=300, columns=300)
    (ok,) = c_store(server.scp.port, [ds])
    assert ok.Status == 0x0000
    # The later report still reaches the PACS: the outbox thread outlived the exception.
    (report,) = pacs.wait_reports(1, timeout=60)
    assert pydicom.dcmread(report).StudyInstanceUID == ds.StudyInstanceUID
    wait_until(lambda: server.state.outbox("delivered"), 30, "the delivery to be recorded")
    assert outbox_alive()
    # The malformed one is still queued (retried with backoff, never lost), and its error names
    # the exception's type and place, not its message.
    (queued,) = server.state.outbox("queued")
    assert queued.report_path == bad and queued.attempts >= 1
    assert queued.last_error.startswith("internal error: InvalidDicomError at ")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "nidaan.outbox")
    assert "InvalidDicomError" in logged
    # Neither the file's contents nor the exception's message (it may quote them) is logged.
    assert "DOE^JANE" not in logged and "DICM" not in logged and "1.2.3.4" not in logged


def _healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class ThreadKilled(BaseException):
    """Ends the thread it is raised in: no ``except Exception`` catches it."""


def _kill(*_: object) -> None:
    raise ThreadKilled


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    ("attribute", "thread"),
    [
        ("studies.report_study", "nidaan-worker-"),
        ("assembler.tick", "nidaan-timer"),
        ("state.due", "nidaan-outbox"),
    ],
)
def test_healthz_names_a_dead_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attribute: str, thread: str
) -> None:
    cfg = make_config(tmp_path)
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    server = NidaanServer(cfg)
    server.start(http=True)
    try:
        assert _healthz(cfg.http.port) == (200, {"status": "serving"})
        # The one test double: the injected fault, in the call each thread's loop makes.
        owner, name = attribute.split(".")
        monkeypatch.setattr(getattr(server, owner), name, _kill)
        if owner == "studies":  # a worker only calls it for a study: send one
            ds, _ = synthetic_cxr(72, rows=300, columns=300)
            (ok,) = c_store(server.scp.port, [ds])
            assert ok.Status == 0x0000
        code, body = wait_until(
            lambda: h if (h := _healthz(cfg.http.port))[0] != 200 else None, 30, "a 503"
        )
        assert code == 503 and body["status"] == "not serving"
        (problem,) = body["problems"]
        assert problem.startswith(f"thread {thread}") and problem.endswith("has stopped")
        assert server.snapshot()["status"] == "not serving"
    finally:
        monkeypatch.undo()
        server.stop()


def test_an_unexpected_exception_is_described_without_its_message() -> None:
    from nidaan.pacs_bridge.outbox import describe

    try:
        raise TypeError("DOE^JANE")
    except TypeError as exc:
        text = describe(exc)
    assert text.startswith("TypeError at test_outbox_health.py:") and "DOE" not in text
