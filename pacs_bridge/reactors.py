"""pynetdicom's two reactors of an accepted association, waking on events instead of polling.

pynetdicom 3.0 runs each association on two threads: the DUL reactor (reads PDUs from the
socket, sends what the upper layers queue) and the association reactor (serves each complete
DIMSE message, answers a release). Both poll: the association reactor sleeps 1 ms on every turn
of its loop, the DUL reactor 1 ms whenever it found nothing to do. Four idle associations cost a
receiving process 0.26 of a core in wake-ups alone (measured with ``nidaan serve``'s SCP in one
process, 5 s, 2-core machine), and under load each wake-up competes for the process's GIL with
the threads doing real work (docs/throughput.md).

Here both wait for something to happen instead:

* the DUL reactor waits in ``select`` on its socket and on a wake-up socket that is written
  whenever a primitive is queued for it to send (:meth:`QuietDUL.send_pdu`) or it is told to
  stop; nothing else needs it sooner (the ARTIM timer runs in seconds);
* the association reactor waits on an event the DUL reactor sets after each event it acts on
  (a DIMSE message assembled, a release or abort received, the connection closed).

Either still wakes every :data:`IDLE_WAIT_S` to check its timers and its partner's health, so a
missed wake-up can only delay, never lose, what the loop would have seen. The loops are
pynetdicom 3.0.4's own (``DULServiceProvider.run_reactor``, ``Association._run_reactor``), with
the sleeps replaced: behaviour, events and states are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

#: The longest either reactor sleeps with nothing to do: the delay a missed wake-up could cause
#: (timers, a partner thread that died, a kill), never the delay of a PDU or a DIMSE message.
IDLE_WAIT_S = 0.02

#: pynetdicom's own loggers, so that its messages read as they always did.
DUL_LOGGER = logging.getLogger("pynetdicom.dul")
ASSOC_LOGGER = logging.getLogger("pynetdicom.association")


class WideSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU with as few ``recv`` calls as the kernel
    allows instead of 4 KiB at a time.

    pynetdicom reads a PDU 4,096 bytes per ``recv``: 128 calls for a 512 KiB CT slice, each of
    which lets go of the GIL and takes it back, so with several associations a receiving process
    spent most of its system calls on GIL hand-overs (``strace -c``: about 2,800 futex calls per
    instance received on four associations). Here one buffer of the PDU's length is filled in
    place (``recv_into``), which returns whatever the kernel holds, up to all of it."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:  # the connection closed: what was read, as pynetdicom returns it
                    break
                got += n
        if got < nr_bytes:
            del buffer[got:]
        return buffer


class QuietDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in ``select`` for its socket or a wake-up."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if threading.current_thread() is not self and self.is_alive():
            self.join()
        return True

    def _idle(self) -> None:
        """Wait until the socket has data, something is queued to send, or IDLE_WAIT_S."""
        if not self.to_provider_queue.empty():
            return
        raw = getattr(self.socket, "socket", None)
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes already buffered: select would not see them (pynetdicom #528)
        waits = [self._wake_r] if raw is None else [raw, self._wake_r]
        try:
            ready, _, _ = select.select(waits, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket closed under us: the loop finds out
            return
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_r.recv(4096)

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``, ``time.sleep`` replaced by
        :meth:`_idle`, and the association reactor nudged after each event acted on."""
        self._idle_timer.start()
        sleep = False
        nudge = getattr(self.assoc, "nudge", None)
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._idle()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                    DUL_LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                if nudge is not None:
                    nudge.set()
                sleep = False
        finally:
            if nudge is not None:
                nudge.set()  # the association reactor sees the DUL gone at once
            for s in (self._wake_r, self._wake_w):
                s.close()


class QuietAssociation(Association):
    """An accepted association whose reactors wait for events (see the module's docstring)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        #: Set by the DUL reactor after each event it acts on.
        self.nudge = threading.Event()
        self.dul = QuietDUL(self)

    def kill(self) -> None:
        self.nudge.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor ``Association._run_reactor``: the 1 ms sleep before each
        turn replaced by a wait for the DUL's nudge (or IDLE_WAIT_S), and any further message
        served at once."""
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:
                self.nudge.wait(IDLE_WAIT_S)
                # Cleared before looking: what arrives after the look sets it again.
                self.nudge.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return
