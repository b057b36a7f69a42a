"""DICOM TLS contexts (PS3.15 Annex B.9 and its BCP 195 profiles).

Both sides: TLS 1.2 or newer, forward-secret AEAD cipher suites only (the BCP 195
non-downgrading profile's intent), and, where a CA bundle is configured, verified certificates
in both directions.
"""

from __future__ import annotations

import ssl

from nidaan.core.config import DicomConfig
from nidaan.core.errors import ConfigError

#: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (TLS 1.2); TLS 1.3 suites are all AEAD.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _base(purpose: ssl.Purpose, dicom: DicomConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    try:
        if dicom.tls_ca:
            ctx.load_verify_locations(cafile=dicom.tls_ca)
        if dicom.tls_certificate:
            ctx.load_cert_chain(dicom.tls_certificate, dicom.tls_private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"DICOM TLS: cannot load the certificates: {exc}") from exc
    return ctx


def server_context(dicom: DicomConfig) -> ssl.SSLContext | None:
    """The SCP's context, or None when TLS is not configured."""
    if not dicom.tls_certificate:
        return None
    ctx = _base(ssl.Purpose.CLIENT_AUTH, dicom)
    # With a CA bundle, a caller must present a certificate it signed.
    ctx.verify_mode = ssl.CERT_REQUIRED if dicom.tls_ca else ssl.CERT_NONE
    return ctx


def client_context(dicom: DicomConfig) -> ssl.SSLContext:
    """The SCU's context for a peer marked ``tls = true``: the peer's certificate is verified."""
    if not dicom.tls_ca:
        raise ConfigError("a TLS peer needs dicom.tls_ca to verify its certificate")
    return _base(ssl.Purpose.SERVER_AUTH, dicom)
