"""Admission: the checks every entrance (the DICOM SCP, the gRPC API) makes on an instance as read,
before anything decodes its pixels.

A failed check raises :class:`~nidaan.core.errors.InputError` whose ``status`` is the DICOM
C-STORE failure status the SCP answers with (PS3.4 Annex B.2.3); the gRPC API answers
INVALID_ARGUMENT with the same message. Messages name the problem, never patient data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from nidaan.core.errors import InputError

from .uids import is_valid_uid

#: 0xA900 Data Set does not match SOP Class: required UIDs are missing or malformed.
DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: 0xC000 Cannot understand.
CANNOT_UNDERSTAND = 0xC000

#: Element values larger than this are left in the received file until read.
DEFER_BYTES = 1 << 20

#: Sequences nested deeper than this are refused: real objects stay within a handful of levels
#: (TID 1500 SRs within about ten), and deep nesting exhausts recursive parsers downstream.
MAX_SEQUENCE_DEPTH = 32

#: The VRs of raw elements that may hold a sequence: SQ, UN (an implicit-VR sequence of a
#: private tag) and None (a raw element whose VR the transfer syntax does not carry).
_MAYBE_SQ = (None, "SQ", "UN")


@dataclass(frozen=True)
class Admitted:
    """An instance that passed admission, with the UIDs everything downstream keys on."""

    dataset: Dataset
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    #: Study Related Instances the sender announced (None when absent or unreadable).
    expected: int | None


def too_deep(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH, top: list | None = None) -> bool:
    """Whether ``ds`` nests sequences deeper than ``limit`` (checked without recursion).

    ``top``: the top-level tags that may hold sequences, when a scan already found them (the
    admission's one pass over the elements, :func:`overrun_element`)."""
    stack = [(ds, 0)]
    try:
        while stack:
            current, depth = stack.pop()
            if current is ds and top is not None:
                tags = top
            else:
                # ``items()`` gives the elements as read: raw, deferred values not fetched.
                tags = [
                    tag for tag, raw in current.items() if getattr(raw, "VR", None) in _MAYBE_SQ
                ]
            for tag in tags:
                # Only sequences (and values whose VR the raw element does not say) are converted:
                # pixel data and the other plain values stay as read.
                elem = current[tag]
                if elem.VR == "SQ":
                    if depth + 1 > limit:
                        return True
                    stack.extend((item, depth + 1) for item in elem.value)
    except RecursionError:  # the parser itself gave up: far too deep
        return True
    return False


def overrun_element(ds: Dataset, file_size: int, sequences: list | None = None) -> str:
    """The first top-level element whose declared length runs past the data, or ''.

    pydicom reads what is there and does not complain (PS3.5 7.1 makes the length binding), so
    the check compares each still-raw element's declared length with the bytes it got, or, for a
    value left on disk (deferred), with where the file ends. ``sequences``, if given, collects
    the tags that may hold sequences (for :func:`too_deep`, sparing it a second pass).
    """
    # ``items()`` gives the elements as read (iterating a Dataset would convert each one, and
    # ``get_item`` would read deferred values from disk): the values stay raw bytes.
    for tag, raw in ds.items():
        if sequences is not None and getattr(raw, "VR", None) in _MAYBE_SQ:
            sequences.append(tag)
        length = getattr(raw, "length", None)
        if length in (None, 0xFFFFFFFF):
            continue
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and len(value) < length:
            return f"element {tag} declares {length} bytes but {len(value)} follow"
        start = getattr(raw, "value_tell", None)
        if value is None and start is not None and start + length > file_size:
            return f"element {tag} declares {length} bytes, past the end of the data"
    return ""


#: Received files up to this size are parsed from memory, read in one call.
IN_MEMORY_BYTES = 4 << 20


def read_file(path: Path, size: int | None = None) -> Dataset:
    """Read a received Part 10 file of ``size`` bytes, leaving large values on disk;
    InputError if unreadable.

    A file of at most IN_MEMORY_BYTES is read whole and parsed from memory: parsing from the
    file makes a system call per element (pydicom asks the file its position at each one,
    about 290 ``lseek`` for a CT slice), and each lets go of the GIL, which a receiving
    process with several associations then waits to get back (docs/throughput.md).
    """
    try:
        if size is not None and size <= IN_MEMORY_BYTES:
            with open(path, "rb", buffering=0) as fh:
                return dcmread(io.BytesIO(fh.read()))
        return dcmread(path, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for corrupt encodings
        raise InputError(f"cannot decode data set: {exc}", status=CANNOT_UNDERSTAND) from exc


def read_bytes(data: bytes) -> Dataset:
    """Read an instance sent as bytes (Part 10 or a bare data set); InputError if unreadable.

    ``force`` reads a bare data set too, and so makes something of any bytes: what has neither
    a Study nor a SOP Instance UID was not DICOM.
    """
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        if "StudyInstanceUID" not in ds and "SOPInstanceUID" not in ds:
            raise InvalidDicomError("no Study or SOP Instance UID")
        return ds
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise InputError(
            f"not a readable DICOM data set ({type(exc).__name__})", status=CANNOT_UNDERSTAND
        ) from exc
    except Exception as exc:  # a malformed file can raise anything from the parser
        raise InputError(
            f"not a readable DICOM data set ({type(exc).__name__})", status=CANNOT_UNDERSTAND
        ) from exc


def admit(ds: Dataset, size: int, max_pixels: int) -> Admitted:
    """Check an instance as read (``size``: bytes received); InputError with its DICOM status."""
    try:
        study_uid = str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        sop_class = str(ds.get("SOPClassUID", ""))
    except AttributeError as exc:
        raise InputError(f"missing UID: {exc}"[:64], status=DOES_NOT_MATCH_SOP_CLASS) from exc
    except Exception as exc:  # a corrupt element met while converting
        raise InputError(f"cannot decode data set: {exc}", status=CANNOT_UNDERSTAND) from exc
    sequences: list = []
    overrun = overrun_element(ds, size, sequences)
    if overrun:
        raise InputError(overrun, status=CANNOT_UNDERSTAND)
    if too_deep(ds, top=sequences):
        raise InputError(
            f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels", status=CANNOT_UNDERSTAND
        )
    if not (is_valid_uid(study_uid) and is_valid_uid(sop_uid)):
        raise InputError("malformed Study/SOP Instance UID", status=DOES_NOT_MATCH_SOP_CLASS)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames
    except (TypeError, ValueError) as exc:
        raise InputError("malformed Rows/Columns/Frames", status=CANNOT_UNDERSTAND) from exc
    if pixels > max_pixels:
        raise InputError(
            f"{pixels} pixels exceed the limit of {max_pixels}", status=CANNOT_UNDERSTAND
        )
    try:
        expected = int(ds.get("NumberOfStudyRelatedInstances") or 0) or None
    except (TypeError, ValueError):
        expected = None
    return Admitted(ds, study_uid, series_uid, sop_uid, sop_class, expected)
