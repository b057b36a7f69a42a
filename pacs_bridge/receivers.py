"""Receiving on every core: C-STORE served by several processes behind one DICOM port.

pynetdicom is pure Python: one process receives at most what one core runs (the PDU parsing,
the staging writes, the header parse, the fsync'd store and the SQLite commit of each instance).
So the main process only accepts: it listens on ``dicom.port``, and hands each accepted
connection (its file descriptor, over a Unix socket, ``SCM_RIGHTS``) to the receiver process
carrying the fewest connections, which runs the association with the same
:class:`~nidaan.pacs_bridge.scp.StorageSCP` as a single process would: the same admission, limits
and TLS (each receiver wraps its connections), and the same durability (each instance fsync'd
and recorded in the shared SQLite state database, in WAL mode, before Success; the audit line
written by the receiver before it answers).

Handing over, rather than every process accepting on one ``SO_REUSEPORT`` port, keeps the load
even: the kernel's hash sends four associations to two listeners 3:1 or 4:0 half of the time.
The main process also counts the node's associations, so ``dicom.max_associations`` holds for
the node, not per process: a connection past it is handed over marked, and its receiver rejects
it (transient, local limit exceeded).

Receivers report back over a pipe each: instances and association ends (for study assembly,
which stays in the main process, so a study spread over associations in different receivers is
assembled as one), C-STORE statuses and rejections (for the metrics), connections closed (for
the balancing), and their log records. A receiver that dies (``kill -9``, a crash) is started
again; its open associations are lost to the sender, who was not answered for what was not
stored, and studies it carried complete by ``dicom.study_idle_timeout_s``. Receivers die with
the main process (``PR_SET_PDEATHSIG``, and the pipe's end-of-file).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from nidaan.core.config import Config

from .scp import Limits, StorageSCP, StoreOutcome

log = logging.getLogger("nidaan.receivers")

#: The key of an association across receivers: the receiver's generation (a new one each time
#: a receiver process starts) in the high bits, the receiver's own association number below.
_KEY_BITS = 32


def association_key(generation: int, assoc_id: int) -> int:
    """An association's number, unique across receivers and their restarts."""
    return (generation << _KEY_BITS) | assoc_id


@dataclass
class _Receiver:
    generation: int
    process: Any
    control: multiprocessing.connection.Connection
    events: multiprocessing.connection.Connection
    open: int = 0
    ready: bool = False
    gone: bool = False  # its event pipe ended
    sent: threading.Lock = field(default_factory=threading.Lock)


class Receivers:
    """``count`` receiver processes behind one listening socket of the main process."""

    def __init__(
        self,
        config: Config,
        count: int,
        limits: Limits,
        *,
        on_instance: Callable[[int, str, str, int | None], None],
        on_association_end: Callable[[int], None],
        on_outcome: Callable[[StoreOutcome], None] = lambda o: None,
        on_rejected: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.config = config
        self.count = count
        self.limits = limits
        self._on_instance = on_instance
        self._on_association_end = on_association_end
        self._on_outcome = on_outcome
        self._on_rejected = on_rejected
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._receivers: list[_Receiver | None] = [None] * count
        self._generation = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        #: Receiver processes started again after they died (status page, tests).
        self.restarts = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, bind: str, port: int, ready_timeout_s: float = 60.0) -> None:
        """Listen on ``bind:port``, start the receivers and return once all are ready.
        OSError if the port is taken."""
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._sock = socket.create_server((bind, port), family=family, backlog=128)
        self._sock.settimeout(0.5)  # the accept loop looks at the stop flag and the receivers
        for i in range(self.count):
            self._spawn(i)
        self._threads = [
            threading.Thread(target=self._events_loop, name="nidaan-receiver-events", daemon=True),
        ]
        self._threads[0].start()
        deadline = time.monotonic() + ready_timeout_s
        while not all(r is not None and r.ready for r in self._receivers):
            dead = [r for r in self._receivers if r is not None and not r.process.is_alive()]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "a DICOM receiver process did not start"
                    + (f" (exit code {dead[0].process.exitcode})" if dead else "")
                )
            time.sleep(0.02)
        accept = threading.Thread(target=self._accept_loop, name="nidaan-accept", daemon=True)
        self._threads.append(accept)
        accept.start()

    @property
    def port(self) -> int:
        """The port the main process listens on."""
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def threads(self) -> list[threading.Thread]:
        """The main process's threads for receiving (for /healthz)."""
        return list(self._threads)

    def pids(self) -> list[int]:
        """The receiver processes' ids (tests kill one)."""
        with self._lock:
            return [r.process.pid for r in self._receivers if r is not None]

    def stop(self) -> None:
        """Stop accepting and stop the receivers (their open associations are aborted)."""
        if self._stop.is_set():
            return
        self._stop.set()
        for t in self._threads:
            if t.name == "nidaan-accept":
                t.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            receivers = [r for r in self._receivers if r is not None]
        for r in receivers:
            with contextlib.suppress(OSError, ValueError), r.sent:
                r.control.send(None)
        for r in receivers:
            r.process.join(timeout=10)
            if r.process.is_alive():
                r.process.kill()
                r.process.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        for r in receivers:
            r.control.close()
            r.events.close()

    # --- receivers -------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
        control, child_control = self._ctx.Pipe(duplex=True)  # a socketpair: fds can pass
        events, child_events = self._ctx.Pipe(duplex=False)
        assert self._sock is not None
        address = self._sock.getsockname()[:2]
        process = self._ctx.Process(
            target=_receiver_main,
            args=(
                self.config,
                self.limits,
                generation,
                (str(address[0]), int(address[1])),
                child_control,
                child_events,
                logging.getLogger("nidaan").getEffectiveLevel(),
            ),
            name=f"nidaan-receiver-{slot}",
            daemon=True,
        )
        process.start()
        child_control.close()
        child_events.close()
        with self._lock:
            self._receivers[slot] = _Receiver(generation, process, control, events)

    def _supervise(self) -> None:
        """Start again each receiver that died."""
        for slot in range(self.count):
            with self._lock:
                r = self._receivers[slot]
            if r is None or r.process.is_alive() or self._stop.is_set():
                continue
            log.error(
                "DICOM receiver %d died (exit code %s); starting it again",
                slot,
                r.process.exitcode,
            )
            r.control.close()
            self.restarts += 1
            self._spawn(slot)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                self._supervise()
                conn, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("accepting a DICOM connection failed")
                time.sleep(0.1)
                continue
            try:
                self._hand_over(conn, address)
            except Exception:  # one connection's trouble never stops the accept loop
                log.exception("handing a DICOM connection to a receiver failed")
            finally:
                conn.close()  # the receiver holds its own copy of the descriptor now

    def _hand_over(self, conn: socket.socket, address: Any) -> None:
        for _ in range(self.count + 1):
            with self._lock:
                alive = [r for r in self._receivers if r is not None and r.ready]
                alive = [r for r in alive if r.process.is_alive()]
                if not alive:
                    break
                target = min(alive, key=lambda r: r.open)
                over_limit = sum(r.open for r in alive) >= self.limits.max_associations
                target.open += 1
            try:
                with target.sent:
                    target.control.send((tuple(address[:2]), over_limit))
                    reduction.send_handle(target.control, conn.fileno(), target.process.pid)
                return
            except OSError:  # it died meanwhile: the next one
                with self._lock:
                    target.open -= 1
                    target.ready = False
        log.error("no DICOM receiver is running: a connection from %s was closed", address[0])

    def _events_loop(self) -> None:
        while True:
            with self._lock:
                by_pipe = {r.events: r for r in self._receivers if r is not None and not r.gone}
            if self._stop.is_set() and not by_pipe:
                return
            if not by_pipe:
                time.sleep(0.05)
                continue
            for pipe in multiprocessing.connection.wait(list(by_pipe), timeout=0.5):
                r = by_pipe[pipe]  # type: ignore[index]
                try:
                    message = r.events.recv()
                except (EOFError, OSError):  # it died: the accept loop starts it again
                    with self._lock:
                        r.ready = False
                        r.gone = True
                    continue
                try:
                    self._handle(r, message)
                except Exception:  # a bug in a callback must not stop the receiving
                    log.exception("handling a receiver's event failed")

    def _handle(self, r: _Receiver, message: Any) -> None:
        if isinstance(message, logging.LogRecord):
            logging.getLogger(message.name).handle(message)
            return
        kind = message[0]
        if kind == "instance":
            _, assoc_id, study_uid, sop_uid, expected = message
            self._on_instance(association_key(r.generation, assoc_id), study_uid, sop_uid, expected)
        elif kind == "end":
            self._on_association_end(association_key(r.generation, message[1]))
        elif kind == "closed":
            with self._lock:
                r.open = max(0, r.open - 1)
        elif kind == "outcome":
            self._on_outcome(message[1])
        elif kind == "rejected":
            self._on_rejected(message[1])
        elif kind == "ready":
            with self._lock:
                r.ready = True

    def health(self) -> list[str]:
        """Receivers not running (each is started again at once; this shows the gap)."""
        if self._stop.is_set():
            return []
        with self._lock:
            return [
                f"DICOM receiver {i} is not running"
                for i, r in enumerate(self._receivers)
                if r is None or not r.process.is_alive()
            ]


# --- the receiver process --------------------------------------------------------------------


class _PipeHandler(logging.Handler):
    """Sends log records to the main process, which logs them with its own handlers."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Formatted here (arguments and tracebacks may not pickle), as QueueHandler does.
            record.msg = self.format(record)
            record.args = None
            record.exc_info = None
            record.exc_text = None
            self._send(record)
        except Exception:
            self.handleError(record)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the main process ends, ``kill -9`` included."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the control pipe's end-of-file stops the loop below
    if os.getppid() == 1:  # the parent was gone before the call
        os._exit(1)


def _receiver_main(
    config: Config,
    limits: Limits,
    generation: int,
    address: tuple[str, int],
    control: multiprocessing.connection.Connection,
    events: multiprocessing.connection.Connection,
    level: int,
) -> None:
    """A receiver process: serve the connections the main process hands over, until told to
    stop or the main process is gone."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the main stops us
    from nidaan.pacs_bridge.audit import AuditLog
    from nidaan.pacs_bridge.spool import Spool
    from nidaan.pacs_bridge.state import StateStore
    from nidaan.pacs_bridge.tls import server_context

    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            events.send(message)

    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(send)]
    logging.getLogger("nidaan").setLevel(level)
    logging.getLogger("pynetdicom").setLevel(max(level, logging.WARNING))
    data = Path(config.storage.data_dir)
    spool = Spool(data)
    state = StateStore(data / "state.sqlite3")
    audit = AuditLog(data / "audit.jsonl")
    scp = StorageSCP(
        config.dicom.ae_title,
        spool,
        state,
        on_instance=lambda a, study, sop, expected: send(("instance", a, study, sop, expected)),
        on_association_end=lambda a: send(("end", a)),
        on_outcome=lambda o: send(("outcome", o)),
        on_rejected=lambda reason: send(("rejected", reason)),
        on_connection_closed=lambda: send(("closed",)),
        audit=audit,
        max_pdu=config.dicom.max_pdu,
        limits=limits,
    )
    scp.serve_handed(address, server_context(config.dicom))
    send(("ready",))
    try:
        while True:
            message = control.recv()
            if message is None:
                break
            client, over_limit = message
            fd = reduction.recv_handle(control)
            scp.take(socket.socket(fileno=fd), client, over_limit=over_limit)
    except (EOFError, OSError):
        pass  # the main process is gone
    finally:
        scp.stop()
        state.close()
        audit.close()
