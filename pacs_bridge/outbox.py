"""The outbox: delivers queued reports to their destinations, several at once, with retries.

A report stays queued, with its attempt count and last error visible in the state database,
until a destination accepts it; a destination that is down only delays its own deliveries.

One dispatcher thread (``nidaan-outbox``, watched by the server's health check) reads the due
items from the database and puts each in its destination's line. Sender threads, started as
lines fill, take items from their destination's line and send them on one association, which
they keep open while the line has more (several C-STOREs per association) and release when it is
empty. A destination has at most ``reports.max_associations_per_peer`` senders, and all
destinations together at most ``reports.max_associations``: several destinations and several
reports to one destination are delivered at once, a peer that hangs holds only its own senders,
and no PACS sees more associations from us than it is configured for.

Nothing ends the dispatcher but :meth:`Outbox.stop`, and nothing ends a sender but an empty line
or the stop: an unexpected exception (a bug, a malformed report file, a state database that is
briefly unavailable) is logged by type and place only (its message may carry values from the
file, so patient data) and the item is retried with the same backoff.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from nidaan.core.config import Config
from nidaan.core.errors import DeliveryError

from .scu import StoreAssociation, context_of
from .state import OutboxItem, StateStore
from .tls import client_context
from .uids import ref

log = logging.getLogger("nidaan.outbox")

#: C-STOREs on one association before it is released and another opened: under a steady flow
#: a line never empties, and a PACS should still see associations end now and then.
MAX_STORES_PER_ASSOCIATION = 100

#: How long :meth:`Outbox.stop` lets senders finish the C-STORE in flight before aborting.
STOP_GRACE_S = 10.0


def backoff(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait after ``attempts`` failed attempts: exponential, capped."""
    return float(min(max_s, initial_s * 2 ** max(0, attempts - 1)))


def describe(exc: BaseException) -> str:
    """An unexpected exception without its message: the type and where it was raised.

    The message of an exception raised while reading or sending a report may quote the report's
    contents (names, IDs); the type and the innermost frame say what broke without them.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {Path(last.filename).name}:{last.lineno} in {last.name}"


class Outbox:
    """Delivers due outbox items: a dispatcher thread and bounded sender threads per peer."""

    def __init__(
        self,
        config: Config,
        state: StateStore,
        on_delivered: Callable[[str], None] = lambda study_uid: None,
        on_attempt: Callable[[OutboxItem, bool, str], None] = lambda item, ok, error: None,
        on_sent: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        """``on_attempt(item, ok, error)`` runs once per delivery attempt and
        ``on_delivered(study_uid)`` once every report of a study is delivered, and
        ``on_sent(seconds)`` with each object's C-STORE time; they run on sender threads,
        possibly several at once."""
        self.config = config
        self.state = state
        self._on_delivered = on_delivered
        self._on_attempt = on_attempt
        self._on_sent = on_sent
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nidaan-outbox", daemon=True)
        # Guards everything below. The dispatcher reads the due items and files them while
        # holding it, and a sender forgets an item (under it) only after recording its attempt:
        # so an item is never filed twice, and never sent again by a stale read of the queue.
        self._lock = threading.Lock()
        self._known: set[int] = set()  # ids in a line or being sent
        self._lines: dict[str, deque[OutboxItem]] = {}
        self._senders: dict[str, int] = {}  # destination -> running sender threads
        self._threads: set[threading.Thread] = set()
        self._open: set[StoreAssociation] = set()
        self._record_failures = 0  # attempts in a row whose outcome could not be recorded
        self._serial = 0

    @property
    def thread(self) -> threading.Thread:
        """The dispatcher thread (the server's health check watches it)."""
        return self._thread

    def start(self) -> None:
        """Start delivering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop delivering: senders finish the C-STORE in flight, then release (idempotent).

        What was not sent stays queued in the database, its attempt count unchanged. A sender
        still busy after :data:`STOP_GRACE_S` (a peer that stopped answering) is aborted.
        """
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)
        deadline = time.monotonic() + STOP_GRACE_S
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = list(self._open)
        for assoc in stuck:
            assoc.abort()
        for t in threads:
            t.join(timeout=1.0)

    def wake(self) -> None:
        """Look at the queue now (a report was just queued)."""
        self._wake.set()

    @property
    def associations(self) -> int:
        """How many associations the senders hold open now."""
        with self._lock:
            return len(self._open)

    # --- the dispatcher ----------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.config.reports
        failures = 0  # passes in a row that could not read the queue
        while not self._stop.is_set():
            self._wake.clear()  # before reading: a wake during the pass brings another pass
            # Nothing here may end the thread. A failure to read the queue loses nothing (the
            # items stay queued in the database); the next pass comes after a backoff, so a
            # lasting fault does not spin.
            try:
                with self._lock:
                    self._file(self.state.due())
                    self._start_senders()
            except Exception as exc:
                failures += 1
                wait = backoff(failures, cfg.retry_initial_s, cfg.retry_max_s)
                log.error(
                    "outbox: reading the queue failed (%s); next pass in %.1f s",
                    describe(exc),
                    wait,
                )
                self._stop.wait(wait)
                continue
            failures = 0
            self._wake.wait(timeout=0.5)

    def _file(self, due: list[OutboxItem]) -> None:
        """Put due items that are not already in hand into their destination's line (locked)."""
        for item in due:
            if item.id not in self._known:
                self._known.add(item.id)
                self._lines.setdefault(item.destination, deque()).append(item)

    def _start_senders(self) -> None:
        """Start senders where lines wait, within the bounds (locked).

        Destinations are served oldest waiting report first, so when the total bound is reached
        the next free association goes to the one that has waited longest.
        """
        cfg = self.config.reports
        free = cfg.max_associations - sum(self._senders.values())
        waiting = sorted((line[0].id, d) for d, line in self._lines.items() if line)
        for _, destination in waiting:
            running = self._senders.get(destination, 0)
            wanted = min(
                cfg.max_associations_per_peer - running, len(self._lines[destination]), free
            )
            for _ in range(max(0, wanted)):
                self._serial += 1
                t = threading.Thread(
                    target=self._send_loop,
                    args=(destination,),
                    name=f"nidaan-send-{destination}-{self._serial}",
                    daemon=True,
                )
                t.start()
                self._threads.add(t)
                self._senders[destination] = self._senders.get(destination, 0) + 1
                free -= 1
            if free <= 0:
                return

    # --- a sender ----------------------------------------------------------------------------

    def _send_loop(self, destination: str) -> None:
        """Send ``destination``'s line on one association, until it is empty or the stop."""
        assoc: list[StoreAssociation | None] = [None]  # the open association, if any
        stores = [0]  # C-STOREs on it
        try:
            while not self._stop.is_set():
                with self._lock:
                    line = self._lines.get(destination)
                    item = line.popleft() if line else None
                if item is None:
                    return
                try:
                    self._deliver(item, assoc, stores)
                    with self._lock:
                        self._record_failures = 0
                except Exception as exc:
                    with self._lock:
                        self._record_failures += 1
                        failures = self._record_failures
                    cfg = self.config.reports
                    wait = backoff(failures, cfg.retry_initial_s, cfg.retry_max_s)
                    log.error(
                        "report %s to %s: recording the attempt failed (%s); it stays queued,"
                        " next try in %.1f s",
                        ref(item.sop_instance_uid),
                        item.destination,
                        describe(exc),
                        wait,
                    )
                    # Held while waiting, so the dispatcher does not hand it out again at once.
                    self._stop.wait(wait)
                finally:
                    with self._lock:
                        self._known.discard(item.id)
        finally:
            self._close(assoc[0])
            with self._lock:
                self._senders[destination] -= 1
                if not self._senders[destination]:
                    del self._senders[destination]
                    if not self._lines.get(destination):
                        self._lines.pop(destination, None)
                self._threads.discard(threading.current_thread())
            self._wake.set()  # a slot is free: another destination may be waiting for it

    def _close(self, assoc: StoreAssociation | None) -> None:
        if assoc is None:
            return
        with self._lock:
            self._open.discard(assoc)
        try:
            assoc.release()
        except Exception as exc:  # the peer went away meanwhile: nothing is owed to it
            log.debug("outbox: releasing an association failed (%s)", describe(exc))

    def _deliver(
        self, item: OutboxItem, assoc: list[StoreAssociation | None], stores: list[int]
    ) -> None:
        """One attempt: send ``item`` on the open association (or a new one), record it.

        ``assoc`` and ``stores`` are the sender's association and its C-STORE count, updated
        in place. Raises only when recording the outcome fails.
        """
        cfg = self.config
        try:
            peer = cfg.peer(item.destination)
            if peer is None:
                raise DeliveryError(f"destination {item.destination} is not a configured peer")
            ds = dcmread(item.report_path)
            current = assoc[0]
            if current is not None and (
                not current.accepts(ds) or stores[0] >= MAX_STORES_PER_ASSOCIATION
            ):
                self._close(current)
                assoc[0] = current = None
            if current is None:
                current = StoreAssociation(
                    calling_ae=cfg.dicom.ae_title,
                    peer_ae=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    timeout_s=cfg.dicom.network_timeout_s,
                    ssl_context=client_context(cfg.dicom) if peer.tls else None,
                )
                with self._lock:
                    self._open.add(current)
                try:
                    current.open([context_of(ds)])
                except BaseException:
                    with self._lock:
                        self._open.discard(current)
                    raise
                assoc[0], stores[0] = current, 0
            stores[0] += 1
            sending = time.monotonic()
            try:
                current.store(ds)
                self._call("on_sent", self._on_sent, time.monotonic() - sending)
            finally:
                if not current.is_open:  # lost, timed out or aborted: the next item opens anew
                    self._close(current)
                    assoc[0] = None
        except DeliveryError as exc:  # our own messages: no patient data
            self._failed(item, str(exc))
            return
        except OSError as exc:  # its text may name the report file, which is named by its UID
            self._failed(item, f"{type(exc).__name__}: {exc.strerror or describe(exc)}")
            return
        except Exception as exc:  # a bug or a malformed report must not end delivery
            self._failed(item, f"internal error: {describe(exc)}")
            return
        # Recorded first: the peer has the report, so a failing callback must not send it again.
        study = self.state.delivered(item.id)
        self._call("on_attempt", self._on_attempt, item, True, "")
        log.info("report %s delivered to %s", ref(item.sop_instance_uid), item.destination)
        if study:
            self._call("on_delivered", self._on_delivered, study)

    def _failed(self, item: OutboxItem, error: str) -> None:
        """Count a failed attempt: retry with backoff, or keep it as a dead letter."""
        cfg = self.config
        wait = backoff(item.attempts + 1, cfg.reports.retry_initial_s, cfg.reports.retry_max_s)
        dead = self.state.retry_later(item.id, time.time() + wait, error, cfg.reports.max_attempts)
        self._call("on_attempt", self._on_attempt, item, False, error)
        if dead:
            log.error(
                "report %s to %s is a dead letter after %d attempts (%s); "
                "re-send it with: nidaan outbox --resend %d",
                ref(item.sop_instance_uid),
                item.destination,
                item.attempts + 1,
                error,
                item.id,
            )
            return
        log.warning(
            "report %s to %s failed (attempt %d), retry in %.0f s: %s",
            ref(item.sop_instance_uid),
            item.destination,
            item.attempts + 1,
            wait,
            error,
        )

    @staticmethod
    def _call(what: str, callback: Callable[..., None], *args: Any) -> None:
        """Run a callback; its failure is logged (type and place) and ends nothing: the
        attempt is already recorded in the database."""
        try:
            callback(*args)
        except Exception as exc:
            log.error("outbox: the %s callback failed (%s)", what, describe(exc))
