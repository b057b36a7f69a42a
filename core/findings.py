"""What a model found in one image, in terms a report writer needs.

These are plain value objects shared by the pipeline (which fills them from model outputs) and
``nidaan.pacs_bridge.reports`` (which turns them into a DICOM Structured Report). They validate on
construction, so a report is never built from a nonsensical finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: nidaan.core imports no third-party package at run time
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class CodedValue:
    """A coded concept: (Code Value, Coding Scheme Designator, Code Meaning), PS3.3 8.8."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not (self.value and self.scheme and self.meaning):
            raise ValueError(f"coded value needs value, scheme and meaning: {self!r}")


@dataclass(frozen=True)
class BoundingBox:
    """An axis-aligned region in source-image pixel coordinates.

    Continuous coordinates as in DICOM SCOORD (PS3.3 C.18.6.1.1): x runs along columns, y along
    rows, and (0.0, 0.0) is the top left corner of the top left pixel, so a box covering the whole
    image is (0, 0, Columns, Rows).
    """

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def __post_init__(self) -> None:
        vals = (self.x_min, self.y_min, self.x_max, self.y_max)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"bounding box has a non-finite coordinate: {vals}")
        if self.x_max <= self.x_min or self.y_max <= self.y_min:
            raise ValueError(f"bounding box is empty: {vals}")
        if self.x_min < 0 or self.y_min < 0:
            raise ValueError(f"bounding box starts outside the image: {vals}")

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        return ((self.x_min + self.x_max) / 2.0, (self.y_min + self.y_max) / 2.0)


@dataclass(frozen=True)
class Finding:
    """One model output for one image: the probability of a finding and where it is."""

    label: str
    code: CodedValue
    probability: float
    threshold: float
    region: BoundingBox | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability of {self.label!r} is outside [0, 1]: {self.probability}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold of {self.label!r} is outside (0, 1): {self.threshold}")

    @property
    def present(self) -> bool:
        """True when the probability reaches the model's operating threshold."""
        return self.probability >= self.threshold


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identifies the model behind findings (what TID 4019 Algorithm Identification needs)."""

    name: str
    version: str
    manufacturer: str = "Nidaan"
    trained_on_synthetic_data: bool = False

    @property
    def not_for_diagnosis(self) -> bool:
        """Results of a model trained on synthetic data must say they are not for diagnosis."""
        return self.trained_on_synthetic_data


@dataclass(frozen=True)
class ImageAnalysis:
    """The findings of one algorithm on one source image.

    ``source`` is the source instance's header (pixel data may be absent): the report needs its
    Study/Series/SOP Instance UIDs, SOP Class UID, Rows and Columns and patient/study module.
    """

    algorithm: AlgorithmInfo
    source: Dataset
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if kw not in self.source:
                raise ValueError(f"source image header lacks {kw}")
