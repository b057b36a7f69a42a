"""The Storage SCU: sends stored files to a peer by C-STORE, several on one association.

An association (PS3.8 7.1) is negotiated once for the presentation contexts asked for and then
carries any number of C-STORE requests (PS3.7 9.1.1) until it is released: the outbox sends a
peer's queued reports on one association instead of paying a connection, a negotiation and (with
TLS) a handshake per report.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from nidaan.core.errors import DeliveryError


def context_of(ds: Dataset) -> tuple[str, str]:
    """The presentation context a stored data set is sent in: its SOP class and its own
    transfer syntax (the outbox sends files as written; reports are Explicit VR Little Endian)."""
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


class StoreAssociation:
    """One association with a peer that carries several C-STOREs.

    Not thread-safe, except :meth:`abort`, which another thread may call to end it at once.
    """

    def __init__(
        self,
        *,
        calling_ae: str,
        peer_ae: str,
        host: str,
        port: int,
        timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.calling_ae, self.peer_ae, self.host, self.port = calling_ae, peer_ae, host, port
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._assoc: Association | None = None

    @property
    def is_open(self) -> bool:
        """Whether it is established and may carry another C-STORE."""
        return self._assoc is not None and bool(self._assoc.is_established)

    def open(self, contexts: Iterable[tuple[str, str]]) -> None:
        """Associate, asking for ``contexts`` (SOP class UID, transfer syntax UID) pairs.

        Raises :class:`DeliveryError` naming the peer when it cannot be reached, refuses the
        association, or accepts none of the contexts.
        """
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        asked = sorted(set(contexts))
        for sop_class, syntax in asked:
            ae.add_requested_context(sop_class, syntax)
        tls_args = None if self.ssl_context is None else (self.ssl_context, self.host)
        where = f"{self.peer_ae} at {self.host}:{self.port}"
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.peer_ae, tls_args=tls_args)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"TLS with {where} failed: {exc}") from exc
        if not assoc.is_established:
            raise DeliveryError(f"association with {where} was not accepted")
        if not assoc.accepted_contexts:
            assoc.release()
            names = ", ".join(f"{UID(s).name} in {UID(t).name}" for s, t in asked)
            raise DeliveryError(f"{where} accepted the association but not {names}")
        self._assoc = assoc

    def accepts(self, ds: Dataset) -> bool:
        """Whether this association may carry ``ds`` as it is stored."""
        if not self.is_open:
            return False
        assert self._assoc is not None
        sop_class, syntax = context_of(ds)
        return any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax
            for cx in self._assoc.accepted_contexts
        )

    def store(self, ds: Dataset) -> None:
        """C-STORE ``ds``; raise :class:`DeliveryError` unless the peer answers Success.

        A failure status leaves the association open for the next data set; a lost connection
        or a time-out ends it (:attr:`is_open` says which).
        """
        if not self.accepts(ds):
            raise DeliveryError(f"no accepted presentation context with {self.peer_ae} for it")
        assert self._assoc is not None
        status = self._assoc.send_c_store(ds)
        code = int(getattr(status, "Status", -1)) if status else -1
        if code == -1:
            self.abort()  # pynetdicom has usually aborted it already; make sure
            raise DeliveryError(
                f"{self.peer_ae} did not answer the C-STORE (connection lost or time-out)"
            )
        # Warnings (0xB000, 0xB007, 0xB006) mean stored with coercion: delivered (PS3.4 B.2.3).
        if code != 0x0000 and (code >> 12) != 0xB:
            raise DeliveryError(f"{self.peer_ae} answered C-STORE with status 0x{code:04X}")

    def release(self) -> None:
        """Release it (A-RELEASE, PS3.8 7.2), if it is open."""
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()

    def abort(self) -> None:
        """End it at once (A-ABORT, PS3.8 7.3): what is in flight is not stored."""
        assoc = self._assoc
        if assoc is not None and assoc.is_established:
            assoc.abort()


def send_file(
    path: Path,
    *,
    calling_ae: str,
    peer_ae: str,
    host: str,
    port: int,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """C-STORE ``path`` to the peer on an association of its own; raise :class:`DeliveryError`
    unless it answers Success. The file is offered in its own transfer syntax."""
    ds = dcmread(path)
    assoc = StoreAssociation(
        calling_ae=calling_ae,
        peer_ae=peer_ae,
        host=host,
        port=port,
        timeout_s=timeout_s,
        ssl_context=ssl_context,
    )
    assoc.open([context_of(ds)])
    try:
        assoc.store(ds)
    finally:
        assoc.release()


def echo(
    *,
    calling_ae: str,
    peer_ae: str,
    host: str,
    port: int,
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """C-ECHO the peer (PS3.7 9.1.5, Verification); '' when it answers Success, else what
    went wrong, in words a person can act on."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    tls_args = None if ssl_context is None else (ssl_context, host)
    try:
        assoc = ae.associate(host, port, ae_title=peer_ae, tls_args=tls_args)
    except OSError as exc:
        return f"cannot connect: {exc.strerror or type(exc).__name__}"
    if assoc.is_rejected:
        return "it rejected the association (does it know our AE title and host?)"
    if not assoc.is_established:
        return f"no association with {host}:{port} (nothing answers there as {peer_ae})"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return "no answer to the C-ECHO"
    if status.Status != 0x0000:
        return f"it answered the C-ECHO with status 0x{int(status.Status):04X}"
    return ""
