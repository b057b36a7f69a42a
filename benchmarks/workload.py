"""The studies the load benchmarks send: synthetic chest radiographs and small chest CT studies
from the demo models' generator, as Part 10 bytes."""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factory import synthetic_ct_series, synthetic_cxr  # noqa: E402

#: Relative weights of the two kinds of study.
MIX = {"radiograph": 3, "ct": 1}
POOL = 8


def _bytes(ds) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def radiograph_studies(n: int = POOL) -> list[list[bytes]]:
    """One-image 1024 x 1024 chest radiograph studies, half with a planted nodule."""
    return [
        [_bytes(synthetic_cxr(500 + i, nodule=i % 2 == 0, rows=1024, columns=1024)[0])]
        for i in range(n)
    ]


def ct_studies(n: int = POOL) -> list[list[bytes]]:
    """Four-slice 512 x 512 chest CT studies with a nodule in one slice."""
    return [
        [_bytes(ds) for ds in synthetic_ct_series(600 + i, (1,), slices=4, size=512)[0]]
        for i in range(n)
    ]
