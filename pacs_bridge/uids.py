"""UID checks and PHI-free references for logs."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

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


_NIDAAN_NAMESPACE = uuid.UUID("5f1d2a8e-6c1b-4e0c-9a57-3c2f4b7d9e10")


def derived_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``: ``2.25.`` + a name-based UUID (PS3.5 B.2).

    Used where the same inputs must give the same UID again (report UIDs, so a re-sent report
    never duplicates in a PACS). pydicom's ``generate_uid(prefix=None)`` ignores its entropy
    sources and is random, so it cannot serve here.
    """
    if not parts or not all(parts):
        raise ValueError("a derived UID needs non-empty parts")
    return f"2.25.{uuid.uuid5(_NIDAAN_NAMESPACE, chr(0).join(parts)).int}"


#: The file in the data dir that holds this installation's node UID.
NODE_UID_FILE = "node-uid"


def node_uid(data_dir: Path) -> str:
    """This installation's UID: generated once (``2.25.`` + a random UUID, PS3.5 B.2) and kept
    in ``<data_dir>/node-uid``, so that every installation's reports name a device of their own
    (the SR's Device Observer UID, TID 1004) and keep naming it across restarts and upgrades.

    OSError when the file cannot be read or written; ValueError when it holds no valid UID.
    """
    path = data_dir / NODE_UID_FILE
    try:
        uid = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        uid = f"2.25.{uuid.uuid4().int}"
        tmp = path.with_name(f".{NODE_UID_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(uid + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a UID another process wrote meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        uid = path.read_text(encoding="ascii").strip()
    if not is_valid_uid(uid):
        raise ValueError(f"{path} does not hold a valid UID; delete it to make a new one")
    return uid


def tracking_uid(key: str) -> str:
    """The Tracking Unique Identifier (TID 4108) of a finding, from its key
    (:attr:`~nidaan.core.findings.ReportedFinding.key`): the same lesion has the same UID in the
    SR, the Segmentation and the presentation state, and in every report of the study."""
    return derived_uid("lesion-tracking", key)
