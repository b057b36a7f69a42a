"""The DICOM SCP: Verification (C-ECHO) and Storage (C-STORE) service class provider.

Handler errors become DICOM statuses (PS3.4 Annex B.2.3, PS3.7 C.4.2.1.4), never a broken
association:

* 0x0000 Success: the instance is durably stored and recorded. Nothing slow runs before it:
  pixel data is decoded later, when the study is analysed, and an image that cannot be decoded
  then becomes a visible failure (quarantine, audit log, the study's state).
* 0xA700 Out of Resources: it could not be stored (disk, database); nothing partial is kept.
* 0xA900 Data Set does not match SOP Class: required UIDs are missing or malformed.
* 0xC000-0xCFFF Cannot understand: the data set cannot be read, or its header breaks a limit.
  The bytes are kept in the quarantine folder with the reason.

Error Comment (0000,0902) carries a short reason that names the problem and no patient data.

Every rejected association (A-ASSOCIATE-RJ, PS3.8 7.1.1.9) is logged at warning level with its
reason and the caller's host and AE title (no patient data) and reported to ``on_rejected``
for the metrics. The SCP either listens itself (:meth:`StorageSCP.start`) or serves connections
another process accepted and handed over (:meth:`StorageSCP.serve_handed`, see
``pacs_bridge.receivers``).

Incoming data sets are staged in the data dir's ``tmp/`` while they arrive (see
:func:`_staged_file`), never in the system temp dir: a staged file is a whole instance, patient
name included.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    StoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from nidaan.core.errors import InputError

from .admission import DOES_NOT_MATCH_SOP_CLASS, admit, read_file
from .audit import AuditLog
from .reactors import QuietAssociation, WideSocket
from .spool import FileChunks, Spool
from .state import InstanceRecord, StateStore
from .uids import ref

log = logging.getLogger("nidaan.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Limits:
    """What the SCP accepts (see ``[dicom]`` in docs/configuration.md)."""

    #: AE title -> allowed host addresses; None accepts any caller.
    known_callers: dict[str, set[str]] | None = None
    max_associations: int = 16
    max_instance_bytes: int = 2_147_483_648
    max_pixels: int = 250_000_000
    max_instances_per_study: int = 10_000
    #: Refuse (0xA700) rather than fill the disk: keep this much free after the write.
    min_free_bytes: int = 1_073_741_824


@dataclass(frozen=True)
class StoreOutcome:
    """What the SCP did with one C-STORE request (for metrics and tests)."""

    status: int
    reason: str = ""
    calling_ae: str = ""
    host: str = ""
    study_uid: str = ""
    sop_instance_uid: str = ""
    #: From the data set's arrival (the handler's event) to this outcome: admission, storage,
    #: fsync, the state database and the audit line, before the answer.
    seconds: float = 0.0


#: Called for each instance before Success is sent: returns whether it is an image to analyse,
#: raises InputError if it is one that cannot be used. It must be quick (header only).
Inspector = Callable[[Dataset, str], bool]

#: A-ASSOCIATE-RJ (result, source, reason/diag.) -> the reason as logged and counted (PS3.8
#: 9.3.4, Table 9-21).
REJECT_REASONS = {
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x03, 0x02): "too many associations",
    (0x02, 0x02, 0x01): "user identity not accepted",
}


def has_pixels(ds: Dataset, calling_ae: str) -> bool:
    """The default :data:`Inspector`: whether the instance carries pixel data to analyse (SRs,
    presentation states and key objects do not). Which model reads it is decided at analysis."""
    return any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _reject_now(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Send A-ASSOCIATE-RJ from an EVT_REQUESTED handler and wait until it is on the wire.

    pynetdicom closes the connection as soon as the handler returns, while its DUL thread may
    not have sent the PDU yet: the caller would read an abort, not the rejection and its reason.
    Once sent, the DUL is in Sta13, awaiting the transport close (PS3.8 9.2, action AE-8).
    """
    assoc.acse.send_reject(result, source, diagnostic)
    deadline = time.monotonic() + 2.0
    while assoc.dul.state_machine.current_state != "Sta13" and time.monotonic() < deadline:
        time.sleep(0.002)


class _SharedContextsHandler(RequestHandler):
    """pynetdicom's request handler, less one deep copy per association.

    pynetdicom gives each association a ``deepcopy`` of the server's presentation contexts:
    every storage SOP class times every transfer syntax, tens of milliseconds of GIL-holding
    Python per association, 20% of the receive path's time when profiled with four
    associations (docs/throughput.md), and far more with one short association per study.
    Negotiation only reads them (``presentation.negotiate_as_acceptor``), and nothing here
    changes them after the server starts, so every association shares the one list. The rest
    is ``RequestHandler._create_association`` of pynetdicom 3.0 as it is.
    """

    def _create_association(self) -> Association:
        assoc = QuietAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        assoc.set_socket(WideSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])  # type: ignore[index]
        return assoc


class _HandedServer(ThreadedAssociationServer):
    """pynetdicom's association server without a socket of its own: it serves connections that
    another process accepted (``server_bind``/``server_activate`` do nothing)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def server_close(self) -> None:
        pass


#: pynetdicom's own factory for the files its chunked receive writes.
_NAMED_TEMPORARY_FILE = dimse_messages.NamedTemporaryFile
#: The Nidaan SCP each AE belongs to (weakly: a stopped SCP is forgotten).
_SCPS: weakref.WeakKeyDictionary[AE, weakref.ref[StorageSCP]] = weakref.WeakKeyDictionary()


def _staged_file(*args: Any, **kwargs: Any) -> Any:
    """``NamedTemporaryFile`` for pynetdicom's chunked receive, in the receiving SCP's staging
    folder.

    pynetdicom (``DIMSEMessage.decode_msg``) stages each incoming C-STORE data set with
    ``NamedTemporaryFile(delete=False)`` in the default temp dir and deletes it only after the
    C-STORE handler returns: a crash leaves the instance there whole, patient name and ID
    included, and pynetdicom has no setting for the folder. It opens the file in the
    association's DUL thread, which names the association and so the AE receiving: a Nidaan
    SCP's data sets go to its data dir's ``tmp/`` (swept at start), any other AE's where
    pynetdicom puts them. Changing ``tempfile.tempdir`` instead would move every temporary file
    of the process, and could not tell two servers in one process apart.
    """
    thread = threading.current_thread()
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    ae = getattr(assoc, "ae", None)
    owner = _SCPS.get(ae) if isinstance(ae, AE) else None
    scp = owner() if owner is not None else None
    if scp is None:
        return _NAMED_TEMPORARY_FILE(*args, **kwargs)
    kwargs["dir"] = scp.spool.staging_dir
    fh = _NAMED_TEMPORARY_FILE(*args, **kwargs)
    scp._staged(assoc, Path(fh.name))
    return fh


dimse_messages.NamedTemporaryFile = _staged_file


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        # LO: at most 64 characters (PS3.5 6.2), trailing spaces being padding: cut, the value
        # would lose a space at the cut on the wire, so the comment sent is the comment kept.
        ds.ErrorComment = comment[:64].rstrip()
    return ds


class StorageSCP:
    """Receives studies, stores them durably, and reports instances and association ends."""

    def __init__(
        self,
        ae_title: str,
        spool: Spool,
        state: StateStore,
        *,
        inspect: Inspector = has_pixels,
        on_instance: Callable[[int, str, str, int | None], None],
        on_association_end: Callable[[int], None],
        on_outcome: Callable[[StoreOutcome], None] = lambda o: None,
        on_rejected: Callable[[str], None] = lambda reason: None,
        on_connection_closed: Callable[[], None] = lambda: None,
        audit: AuditLog | None = None,
        max_pdu: int = 4_194_304,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.spool = spool
        self.state = state
        self.audit = audit
        self._inspect = inspect
        self._on_instance = on_instance
        self._on_association_end = on_association_end
        self._on_outcome = on_outcome
        self._on_rejected = on_rejected
        self._on_connection_closed = on_connection_closed
        self._ssl_context: Any = None
        # Handed-over connections to refuse at once (the node is at max_associations): by fd.
        self._over_limit: set[int] = set()
        # Receive data sets into temporary files rather than memory (a process-wide setting).
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.require_called_aet = True
        self.ae.maximum_associations = self.limits.max_associations
        self.ae.add_supported_context(Verification)
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax is not None:
                self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server: Any = None
        self._assoc_ids: dict[int, int] = {}
        self._next_id = 0
        self._ids_lock = threading.Lock()
        # Files staged per association (by id) that no C-STORE handler has taken yet.
        self._staging: dict[int, set[Path]] = {}
        _SCPS[self.ae] = weakref.ref(self)

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_CONN_CLOSE, self._handle_close),
        ]

    def start(self, bind: str, port: int, ssl_context: Any = None) -> None:
        """Start listening in background threads."""
        self._server = self.ae.start_server(
            (bind, port), block=False, evt_handlers=self._handlers(), ssl_context=ssl_context
        )
        self._server.RequestHandlerClass = _SharedContextsHandler  # socketserver's hook

    def serve_handed(self, address: tuple[str, int], ssl_context: Any = None) -> None:
        """Serve connections given to :meth:`take` instead of listening (a receiver process);
        ``address`` is where the accepting process listens."""
        self._ssl_context = ssl_context
        # The node's limit is the accepting process's to apply (it counts every receiver's
        # associations and flags the ones over it). pynetdicom's own per-AE count here would
        # also include associations released a moment ago whose threads have not ended yet,
        # and reject a new one the node has room for: it stays only as a backstop.
        self.ae.maximum_associations = 2 * self.limits.max_associations
        self._server = _HandedServer(
            self.ae,
            address,
            self.ae.ae_title,
            self.ae.supported_contexts,
            None,  # TLS is wrapped in take()'s thread, not in an accept loop
            self._handlers(),
            request_handler=_SharedContextsHandler,
        )
        self._server.socket.close()  # socketserver made one; this server never listens

    def take(self, sock: socket.socket, address: Any, *, over_limit: bool = False) -> None:
        """Serve one connection another process accepted (its association runs in a thread).

        ``over_limit``: the node already carries ``max_associations``; the association is
        rejected (transient, local limit exceeded, PS3.8 7.1.1.9) once it is requested.
        """
        threading.Thread(
            target=self._serve_one,
            args=(sock, address, over_limit),
            name="nidaan-handed-connection",
            daemon=True,
        ).start()

    def _serve_one(self, sock: socket.socket, address: Any, over_limit: bool) -> None:
        try:
            if self._ssl_context is not None:
                # The handshake here, in the connection's own thread: a slow or hostile client
                # delays only itself.
                sock.settimeout(30)
                sock = self._ssl_context.wrap_socket(sock, server_side=True)
                sock.settimeout(None)
            if over_limit:
                with self._ids_lock:
                    self._over_limit.add(sock.fileno())
            self._server.finish_request(sock, address)
        except Exception as exc:  # e.g. the TLS handshake failed: this connection only
            log.warning("a connection from %s ended before association: %s", address[0], exc)
            try:
                sock.close()
            finally:
                self._on_connection_closed()

    @property
    def port(self) -> int:
        """The port actually bound (useful when started on port 0)."""
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is None:
            return
        if isinstance(self._server, _HandedServer):
            for assoc in self._server.active_associations:
                assoc.abort()
        else:
            self._server.shutdown()
        self._server = None

    def _assoc_id(self, assoc: Any) -> int:
        with self._ids_lock:
            key = id(assoc)
            if key not in self._assoc_ids:
                self._next_id += 1
                self._assoc_ids[key] = self._next_id
            return self._assoc_ids[key]

    def _handle_requested(self, event: Any) -> None:
        """Admission: with known callers configured, only they, from their hosts, may associate.

        A stranger gets A-ASSOCIATE-RJ rejected-permanent, service-user, "calling AE title not
        recognized" (PS3.8 9.3.4), whether its title or its host is wrong, so a probe learns
        nothing about which. A connection handed over while the node is at its association
        limit gets rejected-transient, "local-limit-exceeded".
        """
        assoc = event.assoc
        # At this point only the A-ASSOCIATE-RQ primitive carries the calling AE title.
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        host = str(assoc.requestor.address)
        send_reject = assoc.acse.send_reject

        def logged_reject(result: int, source: int, diagnostic: int) -> None:
            # Every rejection, pynetdicom's own (called AE title, its association limit) and
            # ours, passes here: each is logged and counted with its reason.
            reason = REJECT_REASONS.get(
                (result, source, diagnostic), f"rejected ({result}, {source}, {diagnostic})"
            )
            log.warning("rejected an association from %s calling as %r: %s", host, calling, reason)
            self._on_rejected(reason)
            send_reject(result, source, diagnostic)

        assoc.acse.send_reject = logged_reject
        raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        fileno = raw.fileno() if raw is not None else -1
        with self._ids_lock:
            over_limit = fileno in self._over_limit
            self._over_limit.discard(fileno)
        if over_limit:
            _reject_now(assoc, 0x02, 0x03, 0x02)
            return
        known = self.limits.known_callers
        if known is None:
            return
        if host not in known.get(calling, set()):
            _reject_now(assoc, 0x01, 0x01, 0x03)

    def _staged(self, assoc: Any, path: Path) -> None:
        """A data set of ``assoc`` is being staged at ``path`` (see :func:`_staged_file`)."""
        with self._ids_lock:
            self._staging.setdefault(id(assoc), set()).add(path)

    def _handle_close(self, event: Any) -> None:
        with self._ids_lock:
            assoc_id = self._assoc_ids.pop(id(event.assoc), None)
            left = self._staging.pop(id(event.assoc), set())
        # A data set still arriving when the connection ended (the peer aborted or vanished)
        # never reaches a handler, and pynetdicom deletes only what a handler was given.
        for path in left:
            path.unlink(missing_ok=True)
        if left:
            log.warning(
                "removed %d data set(s) left half-received by a closed connection", len(left)
            )
        if assoc_id is not None:
            self._on_association_end(assoc_id)
        self._on_connection_closed()

    def _outcome(self, event: Any, status: int, reason: str = "", study_uid: str = "") -> None:
        """Report a C-STORE outcome (metrics, audit) with who sent what."""
        requestor = event.assoc.requestor
        outcome = StoreOutcome(
            status,
            reason,
            str(requestor.ae_title).strip(),
            str(requestor.address),
            study_uid,
            str(getattr(event.request, "AffectedSOPInstanceUID", "") or ""),
        )
        if self.audit is not None:
            # Before the answer goes out: the audit trail holds every C-STORE answered.
            self.audit.record(
                "instance",
                status=f"0x{status:04X}",
                reason=reason,
                calling_ae=outcome.calling_ae,
                host=outcome.host,
                study=study_uid,
                sop_instance=outcome.sop_instance_uid,
            )
        started = getattr(event, "timestamp", None)
        if isinstance(started, datetime.datetime):
            outcome = dataclasses.replace(
                outcome, seconds=max(0.0, (datetime.datetime.now() - started).total_seconds())
            )
        self._on_outcome(outcome)

    def _refuse(self, event: Any, chunks: FileChunks | None, status: int, reason: str) -> Dataset:
        where = ""
        if chunks is not None:
            try:
                kept = self.spool.quarantine(
                    chunks,
                    reason,
                    status=status,
                    size=chunks.size,
                    min_free_bytes=self.limits.min_free_bytes,
                )
                where = (
                    f" (quarantined as {kept.name})"
                    if kept.kept
                    else f" (not quarantined: {kept.not_kept}; reason in {kept.name}.json)"
                )
            except OSError as exc:
                where = f" (could not quarantine: {exc.strerror})"
        log.warning("refused an instance with 0x%04X: %s%s", status, reason, where)
        self._outcome(event, status, reason)
        return _status(status, reason)

    def _handle_store(self, event: Any) -> Dataset:
        # pynetdicom's chunked receive (set in __init__) has written the data set, as received,
        # to a temporary Part 10 file: memory holds at most a few chunks of it, whatever its size.
        try:
            received = Path(event.dataset_path)
            with self._ids_lock:  # the handler has it now; pynetdicom deletes it after us
                self._staging.get(id(event.assoc), set()).discard(received)
            size = received.stat().st_size
        except (AttributeError, OSError) as exc:  # the request itself is unusable
            return self._refuse(
                event, None, CANNOT_UNDERSTAND, f"unreadable request: {type(exc).__name__}"
            )
        if size > self.limits.max_instance_bytes:
            return self._refuse(
                event, None, OUT_OF_RESOURCES, f"instance of {size} bytes exceeds the size limit"
            )
        chunks = FileChunks(received, size)
        try:
            # Values over DEFER_BYTES stay on disk until something reads them (the decoder).
            admitted = admit(read_file(received, size), size, self.limits.max_pixels)
        except InputError as exc:
            return self._refuse(event, chunks, exc.status, str(exc))
        ds, study_uid, sop_uid = admitted.dataset, admitted.study_uid, admitted.sop_uid
        if self.state.instance_count(study_uid) >= self.limits.max_instances_per_study:
            return self._refuse(
                event, None, OUT_OF_RESOURCES, "study has the maximum number of instances"
            )
        if sop_uid != str(event.request.AffectedSOPInstanceUID):
            return self._refuse(
                event,
                chunks,
                DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID differs from the request's Affected SOP Instance UID",
            )
        try:
            is_image = self._inspect(ds, str(event.assoc.requestor.ae_title).strip())
        except InputError as exc:
            return self._refuse(event, chunks, exc.status, str(exc))
        except Exception as exc:  # a bug must not break the association; the file is kept
            log.exception("inspecting an instance failed")
            return self._refuse(
                event, chunks, CANNOT_UNDERSTAND, f"internal error: {type(exc).__name__}"
            )
        free = shutil.disk_usage(self.spool.root).free
        if free - size < self.limits.min_free_bytes:
            log.error("refusing an instance: %d bytes free on the spool's disk", free)
            self._outcome(event, OUT_OF_RESOURCES, "disk nearly full", study_uid)
            return _status(OUT_OF_RESOURCES, "the receiver's disk is nearly full")
        existed = self.spool.instance_path(study_uid, sop_uid).exists()
        path = None
        try:
            path = self.spool.adopt(study_uid, sop_uid, received)
            self.state.add_instance(
                InstanceRecord(
                    sop_uid,
                    study_uid,
                    admitted.series_uid,
                    admitted.sop_class,
                    path,
                    bool(is_image),
                ),
                calling_ae=event.assoc.requestor.ae_title,
            )
        except (OSError, sqlite3.Error) as exc:
            log.error("could not store instance %s: %s", ref(sop_uid), exc)
            if path is not None and not existed:
                path.unlink(missing_ok=True)  # not recorded, so not acknowledged: leave nothing
            self._outcome(event, OUT_OF_RESOURCES, "storage failed", study_uid)
            return _status(OUT_OF_RESOURCES, "could not store the instance")
        self._on_instance(self._assoc_id(event.assoc), study_uid, sop_uid, admitted.expected)
        self._outcome(event, SUCCESS, "", study_uid)
        return _status(SUCCESS)
