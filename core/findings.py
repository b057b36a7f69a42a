"""What a model found in one image, in terms a report writer needs.

These are plain value objects shared by the pipeline (which fills them from model outputs) and
``nidaan.pacs_bridge.reports`` (which turns them into a DICOM Structured Report). They validate on
construction, so a report is never built from a nonsensical finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

#: The marker a reader sees on every result of a model trained on synthetic data.
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"

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
class Outline:
    """A closed polygon around one region, in source-image pixel coordinates.

    Continuous coordinates as in DICOM SCOORD (PS3.3 C.18.6.1.1, like :class:`BoundingBox`):
    ``points`` are (x, y) = (column, row) pairs, the first point repeated as the last, so the
    polygon is a closed POLYLINE as TID 1410's Image Region wants it. ``peak`` is the model's
    heatmap value at the region's strongest cell (how sure the model is of *this* region).
    ``refined`` says the outline was sharpened to the model input's pixels (the sidecar's
    ``outline`` rule found the lesion's edge); a heatmap blob's outline (coarse cells) is not,
    and a report gives no size in mm from it.
    """

    points: tuple[tuple[float, float], ...]
    peak: float = 1.0
    refined: bool = False

    def __post_init__(self) -> None:
        if len(self.points) < 4:
            raise ValueError(f"an outline needs at least 3 corners and the closing point: {self}")
        if self.points[0] != self.points[-1]:
            raise ValueError("an outline must be closed (its first point repeated last)")
        if not all(math.isfinite(c) for p in self.points for c in p):
            raise ValueError("an outline has a non-finite coordinate")
        if any(x < 0 or y < 0 for x, y in self.points):
            raise ValueError("an outline starts outside the image (negative coordinate)")
        if self.area <= 0.0:
            raise ValueError("an outline encloses no area")

    @property
    def box(self) -> BoundingBox:
        """The smallest box around the outline."""
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return BoundingBox(min(xs), min(ys), max(xs), max(ys))

    @property
    def area(self) -> float:
        """Enclosed area in square pixels (shoelace formula)."""
        pts = self.points
        twice = sum(
            pts[i][0] * pts[i + 1][1] - pts[i + 1][0] * pts[i][1] for i in range(len(pts) - 1)
        )
        return abs(twice) / 2.0

    @classmethod
    def from_box(cls, box: BoundingBox, peak: float = 1.0, *, refined: bool = False) -> Outline:
        """The box as a closed rectangle."""
        x0, y0, x1, y1 = box.x_min, box.y_min, box.x_max, box.y_max
        return cls(((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)), peak, refined)


@dataclass(frozen=True)
class Finding:
    """One model output for one image: the probability of a finding and where it is.

    ``outlines`` are the separate regions the model points at for this finding on this image,
    strongest first (each may be a separate lesion); ``region`` is the box of the strongest,
    kept for callers that want one box (the gRPC API's ``region``).
    """

    label: str
    code: CodedValue
    probability: float
    threshold: float
    region: BoundingBox | None = None
    outlines: tuple[Outline, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability of {self.label!r} is outside [0, 1]: {self.probability}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold of {self.label!r} is outside (0, 1): {self.threshold}")
        if self.outlines and self.region is None:
            object.__setattr__(self, "region", self.outlines[0].box)
        elif self.region is not None and not self.outlines:
            object.__setattr__(self, "outlines", (Outline.from_box(self.region),))

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
    #: The model's name in the repository (``cxr_screen``); ``name`` is its display name.
    model: str = ""
    #: SHA-256 (hex) of the model file: which weights made a result, and part of the report's
    #: algorithm Device UID, so that the UID changes when the model does.
    digest: str = ""
    #: What the model is for and not for, one sentence per language: (language tag, text)
    #: pairs from the sidecar's ``[model.intended_use]``, English first.
    intended_use: tuple[tuple[str, str], ...] = ()

    def intended_use_in(self, tag: str) -> str:
        """The intended-use statement in language ``tag`` ('' when the sidecar lacks it)."""
        return dict(self.intended_use).get(tag, "")

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


@dataclass(frozen=True)
class LesionPart:
    """A lesion's region on one image."""

    source: Dataset
    outline: Outline
    #: The model's probability for this image.
    probability: float


#: The most lesions of one finding a report lists per study and model. A screening model that
#: marks hundreds of regions (seen: 714 on a synthetic 100-slice CT) would otherwise give a
#: report no one reads and region objects that take minutes to make; the rest are counted.
MAX_LESIONS = 20


@dataclass(frozen=True)
class ReportedFinding:
    """One finding of one model in one study, as a report states it.

    Either one lesion (``present``; its region on each image it spans in ``parts``, in
    anatomical order, empty when the model gave no region), or the finding's absence from
    every image the model analysed (not ``present``, ``parts`` empty): Absent is stated once per
    study and model, not per image. ``sources`` are the images the statement is about.
    ``key`` is what the finding's Tracking Unique Identifier is derived from: the same for the
    same finding of the same study, whichever route or report revision.
    """

    algorithm: AlgorithmInfo
    label: str
    code: CodedValue
    threshold: float
    #: The highest probability among ``sources``.
    probability: float
    present: bool
    sources: tuple[Dataset, ...]
    key: str
    parts: tuple[LesionPart, ...] = ()
    #: Longest in-plane diameter over the parts in mm (cross-sectional images with Pixel Spacing
    #: and refined outlines only); None otherwise.
    size_mm: float | None = None
    #: On the first listed lesion of a finding: how many further lesions of it the study has
    #: that the report does not list (at most ``MAX_LESIONS`` are, the most probable).
    unlisted: int = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError(f"finding {self.label!r} is about no image")
        if not self.key:
            raise ValueError(f"finding {self.label!r} has no tracking key")
        if not self.present and self.parts:
            raise ValueError(f"an absent finding {self.label!r} cannot have regions")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability of {self.label!r} is outside [0, 1]: {self.probability}")
        if self.size_mm is not None and not (math.isfinite(self.size_mm) and self.size_mm > 0):
            raise ValueError(f"size of {self.label!r} must be a positive number of mm")
