"""The outbox: delivers queued reports to their destinations, retrying with backoff.

A report stays queued, with its attempt count and last error visible in the state database,
until a destination accepts it; a destination that is down only delays delivery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

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

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Look at the queue now (a report was just queued)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            for item in self.state.due():
                if self._stop.is_set():
                    return
                self._deliver(item)
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
        except (DeliveryError, OSError) as exc:
            wait = backoff(item.attempts + 1, cfg.reports.retry_initial_s, cfg.reports.retry_max_s)
            dead = self.state.retry_later(
                item.id, time.time() + wait, str(exc), cfg.reports.max_attempts
            )
            self._on_attempt(item, False, str(exc))
            if dead:
                log.error(
                    "report %s to %s is a dead letter after %d attempts (%s); "
                    "re-send it with: nidaan outbox --resend %d",
                    ref(item.sop_instance_uid),
                    item.destination,
                    item.attempts + 1,
                    exc,
                    item.id,
                )
                return
            log.warning(
                "report %s to %s failed (attempt %d), retry in %.0f s: %s",
                ref(item.sop_instance_uid),
                item.destination,
                item.attempts + 1,
                wait,
                exc,
            )
            return
        self._on_attempt(item, True, "")
        log.info("report %s delivered to %s", ref(item.sop_instance_uid), item.destination)
        study = self.state.delivered(item.id)
        if study:
            self._on_delivered(study)
