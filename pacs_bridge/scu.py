"""The Storage SCU: sends one stored file to a peer by C-STORE."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from nidaan.core.errors import DeliveryError


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
    """C-STORE ``path`` to the peer; raise :class:`DeliveryError` unless it answers Success.

    The file is offered in its own transfer syntax (reports are Explicit VR Little Endian).
    """
    ds = dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls_args = None if ssl_context is None else (ssl_context, host)
    try:
        assoc = ae.associate(host, port, ae_title=peer_ae, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"TLS with {peer_ae} at {host}:{port} failed: {exc}") from exc
    if not assoc.is_established:
        raise DeliveryError(f"association with {peer_ae} at {host}:{port} was not accepted")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == -1:
        raise DeliveryError(f"{peer_ae} did not answer the C-STORE (connection lost or time-out)")
    # Warnings (0xB000, 0xB007, 0xB006) mean stored with coercion: delivered (PS3.4 B.2.3).
    if code != 0x0000 and (code >> 12) != 0xB:
        raise DeliveryError(f"{peer_ae} answered C-STORE with status 0x{code:04X}")
