"""Reading an SR's content tree in tests, without trusting our own writer's helpers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset

from peers import need


def walk(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from walk(item)


def codes(ds: Dataset) -> set[str]:
    """Code values of every concept name and coded value in the content tree."""
    out = set()
    for item in walk(ds):
        for kw in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(kw, []):
                out.add(str(code.CodeValue))
    return out


def texts(ds: Dataset) -> list[str]:
    """TEXT and UIDREF values and code meanings, for "does it say X" checks."""
    out = []
    for item in walk(ds):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        for code in item.get("ConceptCodeSequence", []):
            out.append(str(code.CodeMeaning))
    return out


def numbers(ds: Dataset) -> list[float]:
    """Every numeric value in the content tree."""
    return [
        float(mv.NumericValue) for item in walk(ds) for mv in item.get("MeasuredValueSequence", [])
    ]


def graphics(ds: Dataset) -> list[list[float]]:
    """Graphic data of every SCOORD item."""
    return [list(map(float, item.GraphicData)) for item in walk(ds) if "GraphicData" in item]


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines dicom3tools' dciodvfy flags as errors (it exits 1 when there are any)."""
    exe = need("dciodvfy")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dsrdump_ok(path: Path) -> bool:
    """dcmtk's dsrdump can read the SR."""
    # +U8: convert to UTF-8, whatever the SR's character set (a Hindi report is ISO_IR 192).
    # Bytes, not text: dsrdump shortens long values for display, cutting a character in two.
    run = subprocess.run([need("dsrdump"), "+U8", str(path)], capture_output=True, timeout=60)
    return run.returncode == 0


def evidence(sr: Dataset) -> set[str]:
    """SOP Instance UIDs an SR lists in its Current Requested Procedure Evidence Sequence."""
    return {
        item.ReferencedSOPInstanceUID
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
