"""The outbox: delivers queued reports to their destinations, retrying with backoff.

A report stays queued, with its attempt count and last error visible in the state database,
until a destination accepts it; a destination that is down only delays delivery. Nothing ends the
delivery thread but :meth:`Outbox.stop`: an unexpected exception (a bug, a malformed report file, a
state database that is briefly unavailable) is logged by type and place only (its message may
carry values from the file, so patient data) and the item is retried with the same backoff.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from nidaan.core.config import Config
from nidaan.core.errors import DeliveryError

from .scu import send_file
from .state import OutboxItem, StateStore
from .tls import client_context
from .uids import ref

log = logging.getLogger("nidaan.outbox")


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
    """A thread that sends due outbox items."""

    def __init__(
        self,
        config: Config,
        state: StateStore,
        on_delivered: Callable[[str], None] = lambda study_uid: None,
        on_attempt: Callable[[OutboxItem, bool, str], None] = lambda item, ok, error: None,
    ) -> None:
        self.config = config
        self.state = state
        self._on_delivered = on_delivered
        self._on_attempt = on_attempt
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nidaan-outbox", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        """The delivery thread (the server's health check watches it)."""
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Look at the queue now (a report was just queued)."""
        self._wake.set()

    def _run(self) -> None:
        cfg = self.config.reports
        failures = 0  # passes in a row in which something failed outside a delivery attempt
        while not self._stop.is_set():
            # Nothing here may end the thread. What fails outside a delivery attempt (the state
            # database, an audit callback) loses nothing, as the items stay queued in the
            # database; the next pass comes after a backoff, so a lasting fault does not spin.
            ok = True
            try:
                due = self.state.due()
            except Exception as exc:
                ok, due = False, []
                log.error("outbox: reading the queue failed (%s)", describe(exc))
            for item in due:
                if self._stop.is_set():
                    return
                try:
                    self._deliver(item)
                except Exception as exc:
                    ok = False
                    log.error(
                        "report %s to %s: recording the attempt failed (%s); it stays queued",
                        ref(item.sop_instance_uid),
                        item.destination,
                        describe(exc),
                    )
            if not ok:
                failures += 1
                wait = backoff(failures, cfg.retry_initial_s, cfg.retry_max_s)
                log.warning("outbox: next pass in %.1f s", wait)
                self._stop.wait(wait)
                continue
            failures = 0
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _deliver(self, item: OutboxItem) -> None:
        cfg = self.config
        peer = cfg.peer(item.destination)
        try:
            if peer is None:
                raise DeliveryError(f"destination {item.destination} is not a configured peer")
            send_file(
                item.report_path,
                calling_ae=cfg.dicom.ae_title,
                peer_ae=peer.ae_title,
                host=peer.host,
                port=peer.port,
                timeout_s=cfg.dicom.network_timeout_s,
                ssl_context=client_context(cfg.dicom) if peer.tls else None,
            )
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
        self._on_attempt(item, True, "")
        log.info("report %s delivered to %s", ref(item.sop_instance_uid), item.destination)
        if study:
            self._on_delivered(study)

    def _failed(self, item: OutboxItem, error: str) -> None:
        """Count a failed attempt: retry with backoff, or keep it as a dead letter."""
        cfg = self.config
        wait = backoff(item.attempts + 1, cfg.reports.retry_initial_s, cfg.reports.retry_max_s)
        dead = self.state.retry_later(item.id, time.time() + wait, error, cfg.reports.max_attempts)
        self._on_attempt(item, False, error)
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
