"""Locust users for Nidaan: integrators over gRPC, and modalities over DICOM whose studies count
as done when their report comes back.

    .venv/bin/pip install -e '.[bench]'
    # gRPC (IntegratorUser): Analyze calls
    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 16 -r 16 -t 60s \
        --host 127.0.0.1:50051
    # DICOM (DicomUser): C-STORE of whole studies, done when the SR arrives back; Nidaan must
    # know this process as a peer ([[peers]] ae_title = "LOCUST", port = 11113)
    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 4 -r 4 -t 60s DicomUser \
        --dicom-target 127.0.0.1:11112 --report-ae LOCUST --report-port 11113

or headless, with a server started for you: ``benchmarks/load.py`` (gRPC, with a baseline
measured in the same run) and ``benchmarks/locust_dicom.py`` (DICOM). Each request is one study
(a 1024 x 1024 radiograph, or four 512 x 512 CT slices, three radiographs to one CT), drawn from
a pool generated once per locust process by the demo models' generator.

``DicomUser`` sends a study on one association (pynetdicom C-STORE of each instance, then
release: Nidaan completes a study on release) with new Study/Series/SOP Instance UIDs each time,
and waits for the study's SR at a pynetdicom Storage SCP that runs inside this locust process
(started once, by the first DICOM user, as ``--report-ae`` on ``--report-port``). Locust shows
it as request type "DICOM", name "study -> report <kind>", its response time from the start of
the association to the report's arrival. A refused association, a failure status, or no report
within ``--report-timeout`` seconds is a failure. It runs only when named on the command line
(``DicomUser``), so that ``locust -f benchmarks/locustfile.py`` is the gRPC load it always was;
one locust process (not ``--processes``: each would need its own report port).
"""

from __future__ import annotations

import copy
import io
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import gevent
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpcio cooperates with locust's gevent workers

from locust import User, constant, events, task  # noqa: E402

from nidaan.client import Client  # noqa: E402
from nidaan.core.errors import NidaanError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pydicom.uid import generate_uid  # noqa: E402
from workload import MIX, ct_studies, radiograph_studies  # noqa: E402

# Made when locust loads this file, before its run-time clock starts.
STUDIES: dict[str, list[list[bytes]]] = {"radiograph": radiograph_studies(), "ct": ct_studies()}
# gevent's loop caches "now" from when it was made (init_gevent, above): without this, locust's
# --run-time timer counts from before the studies were made, and a run shorter than making them
# (several seconds on a busy machine) ends as soon as it starts, with no request sent.
gevent.get_hub().loop.update_now()


class IntegratorUser(User):
    """Calls Analyze back to back (no think time): a saturation load."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.client = Client(self.host or "127.0.0.1:50051")
        self.turn = 0

    def on_stop(self) -> None:
        self.client.close()

    def _analyze(self, kind: str) -> None:
        studies = STUDIES[kind]
        study = studies[self.turn % len(studies)]
        self.turn += 1
        started = time.perf_counter()
        error: Exception | None = None
        length = 0
        try:
            length = self.client.analyze(study).ByteSize()
        except NidaanError as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"Analyze {kind}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task(MIX["radiograph"])
    def radiograph(self) -> None:
        self._analyze("radiograph")

    @task(MIX["ct"])
    def ct(self) -> None:
        self._analyze("ct")


# --- DICOM: studies by C-STORE, done when the report comes back --------------------------------


@events.init_command_line_parser.add_listener
def _dicom_arguments(parser: Any) -> None:
    """The DICOM user's options (locust's own parser; also in the web UI)."""
    parser.add_argument(
        "--dicom-target", default="127.0.0.1:11112", help="Nidaan's DICOM host:port"
    )
    parser.add_argument("--dicom-called-ae", default="NIDAAN", help="Nidaan's AE title")
    parser.add_argument(
        "--report-ae",
        default="LOCUST",
        help="AE title the DICOM users call with and the report SCP answers to (a Nidaan peer)",
    )
    parser.add_argument("--report-bind", default="127.0.0.1", help="where the report SCP listens")
    parser.add_argument(
        "--report-port", type=int, default=11113, help="the report SCP's port (the peer's port)"
    )
    parser.add_argument(
        "--report-timeout",
        type=float,
        default=60.0,
        help="seconds after sending before a study without a report counts as failed",
    )


class ReportTimeout(Exception):
    """The study was stored but its report did not come back in time."""


class StoreFailed(Exception):
    """The association or a C-STORE was refused."""


class ReportListener:
    """The Storage SCP reports come back to, one per locust process: wakes whoever waits for the
    report of a study (by Study Instance UID). Reports of studies nobody waits for (a timed-out
    one arriving late) are acknowledged and dropped."""

    def __init__(self, ae_title: str, bind: str, port: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self._waiting: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification: C-ECHO works too
        ae.maximum_pdu_size = 0  # no limit: a report in as few PDUs as the sender likes
        server = ae.start_server(
            (bind, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None  # block=False returns the running server
        self.server = server

    def expect(self, study_uid: str) -> threading.Event:
        """An event set when the report of ``study_uid`` arrives (register before sending)."""
        event = threading.Event()
        with self._lock:
            self._waiting[study_uid] = event
        return event

    def forget(self, study_uid: str) -> None:
        with self._lock:
            self._waiting.pop(study_uid, None)

    def _on_store(self, event: Any) -> int:
        try:
            uid = str(event.dataset.StudyInstanceUID)
        except Exception:  # noqa: BLE001 - a data set we cannot read is still acknowledged
            return 0x0000
        with self._lock:
            waiter = self._waiting.pop(uid, None)
        if waiter is not None:
            waiter.set()
        return 0x0000  # Success (PS3.4 Annex B.2.3)

    def close(self) -> None:
        self.server.shutdown()


_listener: ReportListener | None = None
_listener_lock = threading.Lock()
_datasets: dict[str, list[list[Any]]] = {}


def _report_listener(options: Any) -> ReportListener:
    """This process's report SCP, started by the first DICOM user."""
    global _listener
    with _listener_lock:
        if _listener is None:
            _listener = ReportListener(options.report_ae, options.report_bind, options.report_port)
        return _listener


@events.quitting.add_listener
def _close_listener(**_: Any) -> None:
    if _listener is not None:
        _listener.close()


def _study_datasets(kind: str) -> list[list[Any]]:
    """The pool's studies of ``kind`` as data sets (parsed once)."""
    from pydicom import dcmread

    if kind not in _datasets:
        _datasets[kind] = [[dcmread(io.BytesIO(b)) for b in study] for study in STUDIES[kind]]
    return _datasets[kind]


class DicomUser(User):
    """A modality sending whole studies back to back by C-STORE; a study is done when its SR
    arrives back at this process's report SCP."""

    wait_time = constant(0)
    # Only when named on the command line ("DicomUser"); see the module's docstring.
    weight = 1 if "DicomUser" in sys.argv[1:] else 0

    def on_start(self) -> None:
        from pynetdicom import AE

        options = self.environment.parsed_options
        host, _, port = options.dicom_target.rpartition(":")
        self.target = (host or "127.0.0.1", int(port))
        self.called = options.dicom_called_ae
        self.timeout = float(options.report_timeout)
        self.listener = _report_listener(options)
        self.ae = AE(ae_title=options.report_ae)
        self.ae.maximum_pdu_size = 0
        self.ae.network_timeout = self.ae.acse_timeout = self.ae.dimse_timeout = 30
        sop_classes = {
            ds.SOPClassUID for kind in STUDIES for s in _study_datasets(kind) for ds in s
        }
        for uid in sorted(sop_classes):
            self.ae.add_requested_context(uid)
        self.turn = 0

    def _store(self, study: list[Any]) -> int:
        """Send ``study`` on one association; the bytes sent. Raises StoreFailed."""
        assoc = self.ae.associate(*self.target, ae_title=self.called)
        if not assoc.is_established:
            raise StoreFailed(f"association with {self.called} refused or aborted")
        sent = 0
        try:
            for ds in study:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise StoreFailed("C-STORE got no response (connection lost or timed out)")
                if code != 0x0000:
                    comment = getattr(status, "ErrorComment", "")
                    raise StoreFailed(f"C-STORE status 0x{code:04X} {comment}".strip())
                sent += len(ds.PixelData) if "PixelData" in ds else 0
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _send(self, kind: str) -> None:
        pool = _study_datasets(kind)
        template = pool[self.turn % len(pool)]
        self.turn += 1
        study_uid, series_uid = generate_uid(), generate_uid()
        study = []
        for ds in template:  # a study the server has not seen: new UIDs, same pixels
            new = copy.copy(ds)  # shallow: the pixel data element is shared, not copied
            new.StudyInstanceUID, new.SeriesInstanceUID = study_uid, series_uid
            new.SOPInstanceUID = generate_uid()
            new.file_meta = copy.copy(ds.file_meta)
            new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
            study.append(new)
        arrived = self.listener.expect(study_uid)
        started = time.perf_counter()
        error: Exception | None = None
        length = 0
        try:
            length = self._store(study)
            if not arrived.wait(self.timeout):
                raise ReportTimeout(f"no report within {self.timeout:g} s of sending")
        except (StoreFailed, ReportTimeout) as exc:
            error = exc
        finally:
            self.listener.forget(study_uid)
        self.environment.events.request.fire(
            request_type="DICOM",
            name=f"study -> report {kind}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task(MIX["radiograph"])
    def radiograph(self) -> None:
        self._send("radiograph")

    @task(MIX["ct"])
    def ct(self) -> None:
        self._send("ct")


logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one line per PDU otherwise
