"""A study's per-image findings as lesions: what a report states, once per lesion.

A model judges each image on its own (a CT series gives one :class:`ImageAnalysis` per slice);
a report states each *lesion* once, with its region on every image it spans, and a finding's
absence once per study. :func:`group_findings` does that grouping. It is pure (no I/O) and
reads these DICOM attributes of each source image header:

* Study Instance UID (0020,000D), Series Instance UID (0020,000E), SOP Instance UID
  (0008,0018): which study and series an image belongs to, and the tracking keys.
* Image Position (Patient) (0020,0032) and Image Orientation (Patient) (0020,0037), PS3.3
  C.7.6.2.1.1: the slices of a series in order along their normal, the gap between them, and
  where a lesion lies in the patient (+x towards the patient's left, +y posterior, +z towards
  the head).
* Pixel Spacing (0028,0030), PS3.3 10.7.1.3, [row spacing, column spacing] in mm (the distance
  between rows, then between columns): a lesion's size in mm on cross-sectional images (never
  Imager Pixel Spacing (0018,1164): a projection radiograph's spacing is at the detector).
* Modality (0008,0060): projection modalities (CR, DX, MG...) give no size.
* Instance Number (0020,0013): the order of images without a position (radiographs).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from nidaan.core.findings import (
    MAX_LESIONS,
    AlgorithmInfo,
    Finding,
    ImageAnalysis,
    LesionPart,
    Outline,
    ReportedFinding,
)

#: Neighbouring slices farther apart than this many median slice spacings are not adjacent
#: (a gap: a slice missing, or two stacks in one series).
ADJACENT_GAP = 1.5

Vector = tuple[float, float, float]


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    """A multi-valued decimal attribute as n finite floats, or None (absent or malformed)."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split("\\")
    try:
        out = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value]))
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: Pixel Spacing, else Imager Pixel Spacing; or None."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _floats(ds, keyword, 2)
        if spacing is not None and spacing[0] > 0 and spacing[1] > 0:
            return spacing[0], spacing[1]
    return None


@dataclass(frozen=True)
class _Plane:
    """Where an image lies in the patient (PS3.3 C.7.6.2.1.1)."""

    position: Vector  # centre of the first transmitted pixel
    row: Vector  # direction of increasing column
    column: Vector  # direction of increasing row
    normal: Vector  # row x column, unit length

    @property
    def orientation(self) -> tuple[float, ...]:
        """The orientation rounded: images of one series with the same one form a volume."""
        return tuple(round(v, 3) for v in (*self.row, *self.column))

    def patient(self, x: float, y: float, spacing: tuple[float, float] | None) -> Vector:
        """Patient coordinates (mm) of the SCOORD point (x, y) (pixel (0, 0) centred at 0.5)."""
        dr, dc = spacing or (1.0, 1.0)
        u, v = (x - 0.5) * dc, (y - 0.5) * dr
        return (
            self.position[0] + u * self.row[0] + v * self.column[0],
            self.position[1] + u * self.row[1] + v * self.column[1],
            self.position[2] + u * self.row[2] + v * self.column[2],
        )


def _plane(ds: Dataset) -> _Plane | None:
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    if position is None or orientation is None:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        return None
    return _Plane(
        (position[0], position[1], position[2]),
        (r[0], r[1], r[2]),
        (c[0], c[1], c[2]),
        (n[0] / norm, n[1] / norm, n[2] / norm),
    )


def _anatomical(point: Vector) -> tuple[float, float, float]:
    """Sort key of a patient point: superior first, then right to left, then front to back."""
    return (-point[2], point[0], point[1])


def _slice_axis(normal: Vector) -> Vector:
    """The slice normal pointed so that ascending positions along it run in anatomical order:
    superior to inferior (axial), else right to left (sagittal), else anterior to posterior."""
    x, y, z = normal
    if abs(z) > 0.1:
        sign = -1.0 if z > 0 else 1.0
    elif abs(x) > 0.1:
        sign = 1.0 if x > 0 else -1.0
    else:
        sign = 1.0 if y > 0 else -1.0
    return (sign * x, sign * y, sign * z)


def _diameter_mm(outline: Outline, spacing: tuple[float, float] | None) -> float | None:
    """The longest distance between two points of the outline in mm (None without spacing)."""
    if spacing is None:
        return None
    pts = np.asarray(outline.points[:-1], dtype=np.float64)
    mm = pts * np.array([spacing[1], spacing[0]])  # x along a row: column spacing; y: row spacing
    d = mm[:, None, :] - mm[None, :, :]
    longest = float(np.sqrt((d * d).sum(axis=-1)).max())
    return longest if longest > 0 else None


def _overlap(a: Outline, b: Outline) -> bool:
    ba, bb = a.box, b.box
    return (
        ba.x_min < bb.x_max and bb.x_min < ba.x_max and ba.y_min < bb.y_max and bb.y_min < ba.y_max
    )


@dataclass(frozen=True)
class _Image:
    """One image a model analysed, with its finding of one label."""

    analysis: ImageAnalysis
    finding: Finding
    plane: _Plane | None
    #: Its position along its volume's slice axis in mm (0 without a plane).
    along: float
    #: Sort key of the image: volumes in slice order, then other images by Instance Number.
    order: tuple[object, ...]

    @property
    def volume(self) -> tuple[str, tuple[float, ...]] | None:
        """The volume it is a slice of: its series and orientation (None without a plane)."""
        if self.plane is None:
            return None
        return (str(self.analysis.source.SeriesInstanceUID), self.plane.orientation)

    @property
    def sop(self) -> str:
        return str(self.analysis.source.SOPInstanceUID)


@dataclass(frozen=True)
class _Node:
    """One outline of a present finding on one image: a part of some lesion."""

    image: _Image
    rank: int  # its index among the image's outlines (strongest first)
    outline: Outline


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _images(pairs: list[tuple[ImageAnalysis, Finding]]) -> list[_Image]:
    """The images in order: each volume (series and orientation) along its slice axis."""
    out = []
    for analysis, finding in pairs:
        ds = analysis.source
        plane = _plane(ds)
        series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        if plane is None:
            along = 0.0
            order: tuple[object, ...] = (1, series, (), along, _instance_number(ds), sop)
        else:
            axis = _slice_axis(plane.normal)
            along = sum(p * a for p, a in zip(plane.position, axis, strict=True))
            order = (0, series, plane.orientation, along, 0, sop)
        out.append(_Image(analysis, finding, plane, along, order))
    return sorted(out, key=lambda i: i.order)


def _adjacent_pairs(images: list[_Image]) -> list[tuple[_Image, _Image]]:
    """Neighbouring slices of each volume no farther apart than ADJACENT_GAP x its median
    spacing."""
    volumes: dict[tuple[str, tuple[float, ...]], list[_Image]] = {}
    for image in images:
        if image.volume is not None:
            volumes.setdefault(image.volume, []).append(image)
    pairs = []
    for stack in volumes.values():  # each already in slice order
        positions = [i.along for i in stack]
        gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
        steps = [g for g in gaps if g > 1e-6]
        if not steps:
            continue
        limit = ADJACENT_GAP * statistics.median(steps)
        pairs += [
            (a, b) for a, b, gap in zip(stack, stack[1:], gaps, strict=False) if 1e-6 < gap <= limit
        ]
    return pairs


def _lesions(images: list[_Image]) -> list[list[_Node]]:
    """The outlines of present findings grouped into lesions (union-find over adjacent
    slices whose outline boxes overlap); each lesion's parts in slice order."""
    nodes: list[_Node] = []
    by_image: dict[str, list[int]] = {}
    for image in images:
        if not image.finding.present:
            continue
        for rank, outline in enumerate(image.finding.outlines):
            by_image.setdefault(image.sop, []).append(len(nodes))
            nodes.append(_Node(image, rank, outline))
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in _adjacent_pairs(images):
        for i in by_image.get(a.sop, []):
            for j in by_image.get(b.sop, []):
                if _overlap(nodes[i].outline, nodes[j].outline):
                    ri, rj = root(i), root(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[_Node]] = {}
    for i, node in enumerate(nodes):  # nodes are in image order, then rank
        groups.setdefault(root(i), []).append(node)
    return list(groups.values())


#: Modalities of projection images (PS3.3 C.7.3.1.1.1): their pixel spacing is at the detector
#: (Imager Pixel Spacing) or an estimate at some plane; a lesion's true size is not in them.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "XA", "RF", "IO", "PX", "DG"})

#: Grid (mm, patient coordinates) a lesion's centre is rounded to for its tracking key.
TRACKING_GRID_MM = 10.0


def _measurable(node: _Node) -> tuple[float, float] | None:
    """The pixel spacing a part's size may be measured with, or None: only a cross-sectional
    image (Image Position and Orientation (Patient); not a projection modality) with Pixel
    Spacing, and only an outline sharpened to the model input's pixels (``Outline.refined``).
    A radiograph's Imager Pixel Spacing is at the detector (magnified), and a heatmap blob's
    outline is coarse cells: a size in mm from either would mislead."""
    ds = node.image.analysis.source
    if node.image.plane is None or not node.outline.refined:
        return None
    if str(ds.get("Modality", "") or "").upper() in PROJECTION_MODALITIES:
        return None
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is None or spacing[0] <= 0 or spacing[1] <= 0:
        return None
    return spacing[0], spacing[1]


def _centre(parts: list[_Node]) -> Vector | None:
    """A lesion's centre in patient coordinates (mm): its parts' box centres, weighted by their
    areas in mm^2, so that a small part at the lesion's edge (a slice added later) moves it
    little; None unless every part is on an image with a plane."""
    total, acc = 0.0, [0.0, 0.0, 0.0]
    for n in parts:
        plane = n.image.plane
        if plane is None:
            return None
        spacing = pixel_spacing(n.image.analysis.source)
        dr, dc = spacing or (1.0, 1.0)
        weight = max(n.outline.area * dr * dc, 1e-9)
        x, y = n.outline.box.centre
        point = plane.patient(x, y, spacing)
        total += weight
        for k in range(3):
            acc[k] += weight * point[k]
    return (acc[0] / total, acc[1] / total, acc[2] / total)


def _position_key(parts: list[_Node], centre: Vector) -> str:
    """The stable part of a volume lesion's tracking key: its series and the TRACKING_GRID_MM
    cell of patient coordinates its centre lies in (not which slice is strongest, nor how many
    slices the series had when it was analysed)."""
    series = str(parts[0].image.analysis.source.SeriesInstanceUID)
    cell = "|".join(str(math.floor(c / TRACKING_GRID_MM)) for c in centre)
    return f"{series}|{cell}"


def _reported(
    study: str, model: str, parts: list[_Node], algorithm: AlgorithmInfo
) -> tuple[tuple[object, ...], ReportedFinding]:
    """One lesion as a ReportedFinding, and its anatomical sort key."""
    strongest = min(
        parts,
        key=lambda n: (-n.outline.peak, -n.image.finding.probability, n.image.sop, n.rank),
    )
    finding = strongest.image.finding
    sources: list[Dataset] = []
    seen: set[str] = set()
    for n in parts:
        if n.image.sop not in seen:
            seen.add(n.image.sop)
            sources.append(n.image.analysis.source)
    spacings = [_measurable(n) for n in parts]
    sizes = [
        d
        for n, spacing in zip(parts, spacings, strict=True)
        if spacing is not None and (d := _diameter_mm(n.outline, spacing)) is not None
    ]
    centre = _centre(parts)
    if centre is not None:
        key = f"{study}|{model}|{finding.label}|{_position_key(parts, centre)}"
    else:
        key = f"{study}|{model}|{finding.label}|{strongest.image.sop}|{strongest.rank}"
    reported = ReportedFinding(
        algorithm=algorithm,
        label=finding.label,
        code=finding.code,
        threshold=finding.threshold,
        probability=max(n.image.finding.probability for n in parts),
        present=True,
        sources=tuple(sources),
        key=key,
        parts=tuple(
            LesionPart(n.image.analysis.source, n.outline, n.image.finding.probability)
            for n in parts
        ),
        # Every part measurable, or no size: a lesion measured on some of its slices only
        # could be under-sized.
        size_mm=max(sizes) if sizes and all(s is not None for s in spacings) else None,
    )
    if centre is not None:
        return (0, _anatomical(centre), (), key), reported
    image = strongest.image
    cx, cy = strongest.outline.box.centre
    return (1, (), (image.order, cy, cx), key), reported


def _unique_keys(ranked: list[tuple[tuple[object, ...], ReportedFinding]]) -> None:
    """Two lesions whose centres round to the same grid cell: the later ones (in order) get
    ``|2``, ``|3``... so every lesion's key, and Tracking UID, is its own."""
    seen: dict[str, int] = {}
    for i, (order, reported) in enumerate(ranked):
        count = seen[reported.key] = seen.get(reported.key, 0) + 1
        if count > 1:
            ranked[i] = (order, dataclasses.replace(reported, key=f"{reported.key}|{count}"))


def numbered(findings: Sequence[ReportedFinding]) -> list[tuple[ReportedFinding, int]]:
    """Each finding with its number in a report: present ones 1, 2, ... per model and label, in
    the order given (as :func:`group_findings` orders them); absent ones 0. The SR's Tracking
    Identifier and the region objects' segment labels and legends use the same numbers."""
    counts: dict[tuple[str, str], int] = {}
    out = []
    for finding in findings:
        n = 0
        if finding.present:
            slot = (finding.algorithm.model or finding.algorithm.name, finding.label)
            n = counts[slot] = counts.get(slot, 0) + 1
        out.append((finding, n))
    return out


def _most_probable(lesions: list[ReportedFinding]) -> list[ReportedFinding]:
    """At most MAX_LESIONS of one finding's lesions, the most probable, in their order; the
    first kept says how many were left out (``unlisted``)."""
    if len(lesions) <= MAX_LESIONS:
        return lesions
    # By probability, then by the strongest region (on a radiograph all of an image's
    # lesions share the image's probability; their outlines' peaks tell them apart).
    ranked = sorted(
        range(len(lesions)),
        key=lambda i: (
            -lesions[i].probability,
            -max((p.outline.peak for p in lesions[i].parts), default=0.0),
            i,
        ),
    )
    keep = set(ranked[:MAX_LESIONS])
    kept = [f for i, f in enumerate(lesions) if i in keep]
    kept[0] = dataclasses.replace(kept[0], unlisted=len(lesions) - len(kept))
    return kept


def group_findings(analyses: Sequence[ImageAnalysis]) -> list[ReportedFinding]:
    """The findings of a study's analyses, one :class:`ReportedFinding` per lesion.

    Per study, model (``AlgorithmInfo.model``, else its name) and finding label:

    * Images of a series with Image Position and Orientation (Patient) are put in order along
      the slice normal; outlines on adjacent slices (neighbours in that order, at most 1.5 x
      the series' median slice spacing apart) whose boxes overlap are one lesion, its parts in
      slice order. On other images (radiographs) each outline is a lesion of its own.
    * A present finding without an outline is a lesion of its own image, without parts.
    * A lesion's probability is the highest of its images'; its size the longest in-plane
      diameter of its parts' outlines in mm, only where every part can be measured: an outline
      sharpened to the model input's pixels (``Outline.refined``) on a cross-sectional image
      with Pixel Spacing. None on projection radiographs (Imager Pixel Spacing is at the
      detector, magnified) and for outlines of coarse heatmap cells.
    * Where no image has the finding, its absence is stated once: about every image the model
      analysed, with the highest probability among them.

    * At most MAX_LESIONS lesions of a finding are listed, the most probable; the first listed
      counts the others (``unlisted``), which the report states.

    Order: per study and model, each label's lesions in anatomical order (those in volumes
    superior first, then right to left; those on other images by image, then top to bottom,
    then left to right; then lesions without a region), then the model's absent findings.
    Each ``key`` (what a Tracking UID is made from) is, for a lesion in a volume,
    ``study|model|label|series|x|y|z``: the 10 mm cell (TRACKING_GRID_MM) of patient
    coordinates its centre (its parts' box centres weighted by area) lies in, so a revision of
    the report with more slices (one arrived late) keeps it unless the centre crosses a cell
    boundary; ``|2``... for a second lesion in the same cell. On other images (radiographs):
    ``study|model|label|SOP Instance UID of the lesion's strongest part|rank of that outline
    among its image's outlines`` (``...|image`` for a lesion without region; ``...|absent``
    for an absence). Keys are the same whatever order the analyses come in, and unique.
    """
    groups: dict[tuple[str, str], dict[str, list[tuple[ImageAnalysis, Finding]]]] = {}
    label_order: dict[tuple[str, str], dict[str, int]] = {}
    for analysis in analyses:
        study = str(analysis.source.StudyInstanceUID)
        model = analysis.algorithm.model or analysis.algorithm.name
        labels = groups.setdefault((study, model), {})
        order = label_order.setdefault((study, model), {})
        for index, finding in enumerate(analysis.findings):
            labels.setdefault(finding.label, []).append((analysis, finding))
            order.setdefault(finding.label, index)
    out: list[ReportedFinding] = []
    for study, model in sorted(groups):
        labels = groups[(study, model)]
        order = label_order[(study, model)]
        present: list[ReportedFinding] = []
        absent: list[ReportedFinding] = []
        for label in sorted(labels, key=lambda la: (order[la], la)):
            images = _images(labels[label])
            algorithm = images[0].analysis.algorithm
            found = [i for i in images if i.finding.present]
            if not found:
                first = images[0].finding
                absent.append(
                    ReportedFinding(
                        algorithm=algorithm,
                        label=label,
                        code=first.code,
                        threshold=first.threshold,
                        probability=max(i.finding.probability for i in images),
                        present=False,
                        sources=tuple(i.analysis.source for i in images),
                        key=f"{study}|{model}|{label}|absent",
                    )
                )
                continue
            ranked: list[tuple[tuple[object, ...], ReportedFinding]] = []
            for parts in _lesions(images):
                ranked.append(_reported(study, model, parts, parts[0].image.analysis.algorithm))
            ranked.sort(key=lambda kr: kr[0])
            _unique_keys(ranked)
            for image in found:
                if image.finding.outlines:
                    continue
                f = image.finding
                key = f"{study}|{model}|{label}|{image.sop}|image"
                reported = ReportedFinding(
                    algorithm=image.analysis.algorithm,
                    label=label,
                    code=f.code,
                    threshold=f.threshold,
                    probability=f.probability,
                    present=True,
                    sources=(image.analysis.source,),
                    key=key,
                )
                ranked.append(((2, (), image.order, key), reported))
            present += _most_probable([r for _, r in sorted(ranked, key=lambda kr: kr[0])])
        out += present + absent
    return out
