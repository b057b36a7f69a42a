"""UID checks and PHI-free references for logs."""

from __future__ import annotations

import hashlib
import re

# PS3.5 9.1: components of digits separated by '.', no leading zeros, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a well-formed DICOM UID (so it is also safe as a file name)."""
    return 0 < len(uid) <= 64 and bool(_UID.match(uid))


def ref(uid: str) -> str:
    """A short, stable, non-reversible reference to a UID for logs and metrics.

    Study and instance UIDs identify a patient's examination; logs carry this digest instead so
    an operator can correlate lines without the log holding identifiers.
    """
    return hashlib.sha256(uid.encode()).hexdigest()[:12]
