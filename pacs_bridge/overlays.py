"""Regions every viewer shows: AI lesions as DICOM Segmentation, GSPS and Secondary Capture.

The SR (:mod:`nidaan.pacs_bridge.reports`) states what was found; a viewer draws little of it.
These three objects put each present lesion's outline where viewers look, each for a different
kind of viewer, all as new series of the *source* study (Patient and General Study modules as
the SR has them: the attributes the study's images agree on, ``study_attributes``, so a PACS
files them next to the images and under the same accession):

* **Segmentation** (PS3.3 A.51, Segmentation IOD; C.8.20 Segmentation Image module): the
  machine-readable region, what AIR-style consumers and segmentation-aware viewers read. One SEG
  per source series (highdicom derives a SEG from images of one series), Segmentation Type
  BINARY, one segment per lesion (C.8.20.2 Segment Sequence: label and Tracking ID the SR's
  Tracking Identifier of the lesion, e.g. "Pulmonary nodule 1", and its Tracking UID; Segmented
  Property Category (49755003, SCT, "Morphologically Abnormal Structure"), Segmented Property
  Type the finding's code, Segment Algorithm Type AUTOMATIC with the model in Segmentation
  Algorithm Identification, C.8.20.2 / 10.16), and a frame only on images where that lesion has
  a part, each frame referencing its source image (C.7.6.16.2.6 Derivation Image, Source Image
  Sequence). Masks are rasterised from the outline by the pixel-centre rule: pixel (row r,
  column c) is in the lesion when its centre (c + 0.5, r + 0.5), in the continuous SCOORD
  coordinates of PS3.3 C.18.6.1.1 that :class:`~nidaan.core.findings.Outline` uses, lies inside
  the polygon (even-odd rule). An outline too small to cover any pixel centre marks the pixel
  holding its box centre, so no part is silently dropped.
* **Grayscale Softcopy Presentation State** (PS3.3 A.33.1; C.10.5 Graphic Annotation, C.10.7
  Graphic Layer, C.11.8 Softcopy VOI LUT, C.11.6 Softcopy Presentation LUT): what nearly every
  PACS viewer draws. One per source series, referencing exactly the images that carry a part
  (C.11.11 Presentation State Relationship). Layer ``AI_REGIONS`` holds each part's outline as
  a closed POLYLINE in PIXEL units on its image and the lesion's legend as a text object just
  above (or below) it, anchored to the outline; layer ``AI_LEGEND`` holds "NOT FOR DIAGNOSIS"
  in DISPLAY units at the top left when any finding's model says so. A presentation state
  replaces the image's own grayscale pipeline and its Photometric Interpretation is ignored
  (PS3.4 N.2): a MONOCHROME1 source therefore gets Presentation LUT Shape INVERSE (C.11.6.1.2),
  a MONOCHROME2 one IDENTITY (highdicom's default is always IDENTITY, so this is set here). The
  source's VOI (Window Center/Width, VOI LUT) is kept as the Softcopy VOI LUT; a source without
  one gets a min-max window over its modality values, so it is never shown unwindowed.
* **Secondary Capture** (PS3.3 A.8.1, SC Image IOD): for viewers and systems that show only
  pixels. Per image with parts: an 8-bit RGB copy of the image (modality LUT, then the image's
  first window, LINEAR / LINEAR_EXACT / SIGMOID as C.11.2.1.2 defines them, or min-max without
  one; MONOCHROME1 inverted so it looks as the source does), the outlines burned in in yellow
  with each lesion's name beside its outline, and a band of text at the top (the legends, and
  "NOT FOR DIAGNOSIS" in red when a model says so); Image Comments repeats that text. Burned
  In Annotation (C.7.6.1.1.11) is YES,
  and Source Image Sequence (C.7.6.1, with purpose (121322, DCM, "Source image for image
  processing operation")) and Derivation Description say what it was made from.

Every builder refuses input it cannot make a conformant object from, raising ValueError naming
the problem: no present finding with a region, a part whose source is not in ``images``, an
outline outside its image, images of more than one study, a multi-frame source, malformed or
reused UIDs, a UID missing for a series (or image) that needs one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from nidaan.core.findings import NOT_FOR_DIAGNOSIS, Outline, ReportedFinding

from .languages import Language, load_language
from .lesions import numbered
from .uids import derived_uid, is_valid_uid, tracking_uid

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "Legend",
    "build_presentation_states",
    "build_secondary_captures",
    "build_segmentations",
    "default_legend",
    "legend_in",
    "lesion_name",
    "lesion_tracking_uid",
    "outline_mask",
    "overlay_uids",
]

#: A lesion's legend text from its finding and its number (1, 2, ... per finding label).
Legend = Callable[[ReportedFinding, int], str]

_MANUFACTURER = "Nidaan"
_MODEL_NAME = "Nidaan inference server"
_DESCRIPTION = "Nidaan AI regions"
#: (49755003, SCT, "Morphologically Abnormal Structure"): CID 7150 category of a lesion.
_ABNORMAL_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
_PIXEL_DATA = Tag("PixelData")
_OUTLINE_RGB = (255, 255, 0)
_TEXT_RGB = (255, 255, 255)
_NFD_RGB = (255, 64, 64)
_STROKE_RGB = (0, 0, 0)


def lesion_name(finding: ReportedFinding, number: int) -> str:
    """A lesion's name for a person, as the SR's Tracking Identifier says it: the finding's
    English name from the language data and its number, e.g. ``Pulmonary nodule 1`` (never a
    model's internal label such as ``tb``)."""
    return f"{load_language('en').finding(finding.code)} {number}"


def default_legend(finding: ReportedFinding, number: int) -> str:
    """English legend of a lesion, e.g. ``Pulmonary nodule 1: 0.87 (threshold 0.38) —
    cxr_screen 0.1.0 — NOT FOR DIAGNOSIS`` (the last part only when the model is not for
    diagnosis)."""
    algo = finding.algorithm
    text = (
        f"{lesion_name(finding, number)}: {finding.probability:.2f} "
        f"(threshold {finding.threshold:.2f}) — {algo.model or algo.name} {algo.version}"
    )
    return f"{text} — {NOT_FOR_DIAGNOSIS}" if algo.not_for_diagnosis else text


def finding_line(language: Language, finding: ReportedFinding, number: int) -> str:
    """A lesion's legend in ``language``, e.g. ``फेफड़े की गांठ (पल्मोनरी नोड्यूल) 1: संभावना 0.87
    (सीमा 0.38)``."""
    return language.term(
        "finding_line",
        name=language.finding(finding.code),
        n=number,
        probability=f"{finding.probability:.2f}",
        threshold=f"{finding.threshold:.2f}",
    )


def legend_in(language: Language | None) -> Legend:
    """The English legend, followed by the same in ``language`` (None: English only), e.g.
    ``Pulmonary nodule 1: 0.87 (threshold 0.38) — ... / फेफड़े की गांठ ... 1: संभावना 0.87 (सीमा 0.38)``,
    for the presentation state's text (ISO_IR 192): a viewer draws it with its own fonts."""
    if language is None or language.tag == "en":
        return default_legend

    def legend(finding: ReportedFinding, number: int) -> str:
        other = finding_line(language, finding, number)
        if finding.algorithm.not_for_diagnosis:
            other += " — " + language.term("not_for_diagnosis")
        return f"{default_legend(finding, number)} / {other}"

    return legend


def lesion_tracking_uid(finding: ReportedFinding) -> str:
    """The Tracking UID of a lesion's segment and outlines: derived from the finding's key, so
    the same lesion gets the same UID in every rebuilt object."""
    return tracking_uid(finding.key)


def overlay_uids(kind: str, key: str, sources: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Deterministic UIDs for one kind of overlay object (``"seg"``, ``"pr"``, ``"sc"``).

    Returns the new series' Series Instance UID and, for each source UID in ``sources`` (source
    Series Instance UIDs for SEG and GSPS, source SOP Instance UIDs for SC), the SOP Instance UID
    of its object. ``key`` is what a rebuild must share (e.g. the report key), so a re-sent
    object replaces, rather than duplicates, the one in the PACS.
    """
    if not kind or not key:
        raise ValueError("overlay UIDs need a kind and a non-empty key")
    series = derived_uid("overlay-series", kind, key)
    return series, {uid: derived_uid("overlay-instance", kind, key, uid) for uid in sources}


def outline_mask(outline: Outline, rows: int, columns: int) -> np.ndarray:
    """Boolean (rows, columns) mask of the pixels whose centres lie inside ``outline``.

    Pixel (r, c) has its centre at SCOORD (x, y) = (c + 0.5, r + 0.5) (PS3.3 C.18.6.1.1); the
    even-odd rule decides inside, each edge counting as crossing a row when the row's centre
    line is in [lower end, upper end). Exact, unlike a rasteriser that rounds vertices to whole
    pixels (PIL's polygon fill does), and needs only NumPy.
    """
    mask = np.zeros((rows, columns), dtype=bool)
    pts = np.asarray(outline.points, dtype=np.float64)
    box = outline.box
    r0, r1 = max(0, math.floor(box.y_min) - 1), min(rows, math.ceil(box.y_max) + 1)
    c0, c1 = max(0, math.floor(box.x_min) - 1), min(columns, math.ceil(box.x_max) + 1)
    if r0 >= r1 or c0 >= c1:
        return mask
    yc = np.arange(r0, r1, dtype=np.float64) + 0.5
    xc = np.arange(c0, c1, dtype=np.float64) + 0.5
    inside = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for (xa, ya), (xb, yb) in zip(pts[:-1], pts[1:], strict=True):
        if ya == yb:
            continue  # a horizontal edge crosses no row centre line
        crosses = (ya <= yc) != (yb <= yc)
        if not crosses.any():
            continue
        x_at = xa + (yc[crosses] - ya) * (xb - xa) / (yb - ya)
        inside[crosses] ^= xc[None, :] < x_at[:, None]
    mask[r0:r1, c0:c1] = inside
    return mask


@dataclass(frozen=True, eq=False)
class _Lesion:
    finding: ReportedFinding
    number: int
    legend: str

    @property
    def label(self) -> str:
        """``Pulmonary nodule 1``: the segment label and the SC's tag."""
        return lesion_name(self.finding, self.number)

    @property
    def tracking_id(self) -> str:
        """The SR's Tracking Identifier of the same lesion (with the same Tracking UID)."""
        return self.label[:64]


def _lesions(findings: Sequence[ReportedFinding], legend: Legend) -> list[_Lesion]:
    """The present findings with regions, numbered as the SR numbers them (per model and label
    in the order given, :func:`~nidaan.pacs_bridge.lesions.numbered`)."""
    return [
        _Lesion(finding, n, legend(finding, n))
        for finding, n in numbered(findings)
        if finding.present and finding.parts
    ]


def _study(ds: Dataset, attributes: Mapping[str, object] | None) -> None:
    """Give an object the study's agreed Patient and General Study attributes (those the SR
    carries, :func:`~nidaan.pacs_bridge.reports.study_attributes`), not only what its own source
    image had: a CT slice without an Accession Number must not make a SEG without one. Specific
    Character Set becomes ISO_IR 192 when a value needs more than ASCII."""
    if not attributes:
        return
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if any(not str(v).isascii() for v in attributes.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"


def _check(
    findings: Sequence[ReportedFinding],
    images: Mapping[str, Dataset],
    legend: Legend,
    series_instance_uid: str,
    *,
    need_pixels: bool,
) -> list[_Lesion]:
    """Refuse input that cannot make conformant objects, saying why; the lesions to draw."""
    lesions = _lesions(findings, legend)
    if not lesions:
        raise ValueError("no present finding with a region (parts) to draw")
    studies: set[str] = set()
    for lesion in lesions:
        for part in lesion.finding.parts:
            uid = str(part.source.SOPInstanceUID)
            image = images.get(uid)
            if image is None:
                raise ValueError(
                    f"{lesion.label}: its part's source image {uid} is not among the images"
                )
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Rows", "Columns"):
                if kw not in image:
                    raise ValueError(f"source image {uid} lacks {kw}")
            if int(image.get("NumberOfFrames", 1) or 1) > 1:
                raise ValueError(f"source image {uid} is multi-frame; only single frames are drawn")
            if int(image.get("SamplesPerPixel", 1)) != 1:
                raise ValueError(f"source image {uid} is not grayscale (Samples per Pixel != 1)")
            if need_pixels and "PixelData" not in image:
                raise ValueError(f"source image {uid} has no Pixel Data")
            rows, columns = int(image.Rows), int(image.Columns)
            box = part.outline.box
            if box.x_max > columns or box.y_max > rows:
                raise ValueError(
                    f"{lesion.label}: outline {box} is outside the {columns}x{rows} image {uid}"
                )
            studies.add(str(image.StudyInstanceUID))
            if str(image.SeriesInstanceUID) == series_instance_uid:
                raise ValueError("series_instance_uid is a source image's series; use a new one")
    if len(studies) != 1:
        raise ValueError(
            f"the regions' images come from {len(studies)} studies ({', '.join(sorted(studies))});"
            " these objects belong to one study"
        )
    if not is_valid_uid(series_instance_uid):
        raise ValueError(f"series_instance_uid is not a valid UID: {series_instance_uid!r}")
    return lesions


def _sop_uid(sop_instance_uids: Mapping[str, str], key: str, what: str) -> str:
    uid = sop_instance_uids.get(key)
    if uid is None:
        raise ValueError(f"sop_instance_uids has no SOP Instance UID for {what} {key}")
    if not is_valid_uid(uid):
        raise ValueError(f"the SOP Instance UID for {what} {key} is not a valid UID: {uid!r}")
    return uid


def _order(image: Dataset) -> tuple[int, str]:
    return (int(image.get("InstanceNumber", 0) or 0), str(image.SOPInstanceUID))


def _by_series(
    lesions: Sequence[_Lesion], images: Mapping[str, Dataset]
) -> dict[str, list[Dataset]]:
    """Source Series Instance UID -> the images there with a part, in instance order."""
    series: dict[str, dict[str, Dataset]] = {}
    for lesion in lesions:
        for part in lesion.finding.parts:
            image = images[str(part.source.SOPInstanceUID)]
            series.setdefault(str(image.SeriesInstanceUID), {})[str(image.SOPInstanceUID)] = image
    return {uid: sorted(imgs.values(), key=_order) for uid, imgs in series.items()}


def _description(lesions: Sequence[_Lesion]) -> str:
    nfd = any(lesion.finding.algorithm.not_for_diagnosis for lesion in lesions)
    return _DESCRIPTION + (f" - {NOT_FOR_DIAGNOSIS}" if nfd else "")


def _header(image: Dataset) -> Dataset:
    """The image's attributes without its pixels, and without a Pixel Spacing that is not
    positive (some real headers carry 0\\0, which highdicom would copy into the SEG)."""
    header = Dataset()
    for element in image:
        if element.tag == _PIXEL_DATA:
            continue
        if element.keyword == "PixelSpacing" and not _positive(element.value):
            continue
        header.add(element)
    if hasattr(image, "file_meta"):
        header.file_meta = image.file_meta
    return header


def _positive(values: object) -> bool:
    try:
        return all(float(v) > 0 for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False


def _laterality(refs: Sequence[Dataset]) -> str | None:
    """The source series' Laterality (General Series, C.7.3.1; type 2C), None when unknown."""
    values = {str(i.get("Laterality", "") or "") for i in refs}
    return values.pop() if len(values) == 1 and "" not in values else None


def _same_size(images: Sequence[Dataset], series_uid: str) -> None:
    if len({(int(i.Rows), int(i.Columns)) for i in images}) > 1:
        raise ValueError(
            f"images of series {series_uid} differ in size; one object cannot hold them"
        )


def build_segmentations(
    findings: Sequence[ReportedFinding],
    images: Mapping[str, Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uids: Mapping[str, str],
    software_versions: str,
    series_number: int = 9902,
    manufacturer: str = _MANUFACTURER,
    manufacturer_model_name: str = _MODEL_NAME,
    device_serial_number: str = "0",
    legend: Legend = default_legend,
    study_attributes: Mapping[str, object] | None = None,
) -> list[hd.seg.Segmentation]:
    """One binary SEG per source series holding the present findings' regions.

    ``images`` maps SOP Instance UID to the source data set (headers suffice here);
    ``sop_instance_uids`` maps each source Series Instance UID to its SEG's SOP Instance UID
    (see :func:`overlay_uids`); all SEGs go into the new series ``series_instance_uid``. Segment
    labels are the lesions' names as the SR gives them (``Pulmonary nodule 1``);
    ``study_attributes`` the Patient and General Study attributes the SR carries (default: the
    source images'); see the module docstring.
    """
    lesions = _check(findings, images, legend, series_instance_uid, need_pixels=False)
    out = []
    for number, (series_uid, refs) in enumerate(_by_series(lesions, images).items(), start=1):
        _same_size(refs, series_uid)
        sop_uid = _sop_uid(sop_instance_uids, series_uid, "source series")
        in_series = {str(image.SOPInstanceUID) for image in refs}
        here = [
            lesion
            for lesion in lesions
            if any(str(p.source.SOPInstanceUID) in in_series for p in lesion.finding.parts)
        ]
        # Only the images a region lies on: a frame per image of the series would make a
        # 100-slice CT's mask array (and highdicom's checks of it) a hundred frames per segment
        # for a lesion on three slices. Empty frames were omitted from the SEG anyway.
        holding = {str(p.source.SOPInstanceUID) for lesion in here for p in lesion.finding.parts}
        refs = [image for image in refs if str(image.SOPInstanceUID) in holding]
        index = {str(image.SOPInstanceUID): k for k, image in enumerate(refs)}
        rows, columns = int(refs[0].Rows), int(refs[0].Columns)
        masks = _segment_masks(here, index, rows, columns)
        descriptions = []
        for s, lesion in enumerate(here):
            finding = lesion.finding
            algo = finding.algorithm
            parameters = {"operating_threshold": f"{finding.threshold:g}"}
            if algo.not_for_diagnosis:
                parameters["use"] = f"{NOT_FOR_DIAGNOSIS} (trained on synthetic images only)"
            descriptions.append(
                hd.seg.SegmentDescription(
                    segment_number=s + 1,
                    segment_label=lesion.label[:64],
                    segmented_property_category=_ABNORMAL_STRUCTURE,
                    segmented_property_type=hd.sr.CodedConcept(
                        finding.code.value, finding.code.scheme, finding.code.meaning
                    ),
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=hd.AlgorithmIdentificationSequence(
                        name=algo.name,
                        family=codes.DCM.ArtificialIntelligence,
                        version=algo.version,
                        source=algo.manufacturer,
                        parameters=parameters,
                    ),
                    tracking_uid=lesion_tracking_uid(finding),
                    tracking_id=lesion.tracking_id,
                    display_color=hd.color.CIELabColor(*_lab(_OUTLINE_RGB)),
                )
            )
        seg = hd.seg.Segmentation(
            source_images=[_header(image) for image in refs],
            pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions,
            device_serial_number=device_serial_number,
            content_label="AI_REGIONS",
            content_description=_description(here)[:64],
            series_description=_description(lesions),
            omit_empty_frames=True,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        if "FrameOfReferenceUID" not in seg:
            # General Image (C.7.6.1): Patient Orientation is type 2C without a frame of
            # reference; the source's, or present and empty when it has none.
            orientation = _patient_orientation(refs[0])
            seg.PatientOrientation = list(orientation) if orientation else None
        _study(seg, study_attributes)
        out.append(seg)
    return out


def _segment_masks(
    lesions: Sequence[_Lesion], index: Mapping[str, int], rows: int, columns: int
) -> np.ndarray:
    """The SEG's pixel array: a label map (frames, rows, columns) of segment numbers when no two
    lesions share a pixel, else one boolean plane per segment (frames, rows, columns, segments).

    Why two forms: highdicom checks a stack of planes for overlap by summing it over the
    segments, which on a 1955 x 1841 radiograph with three lesions was 58 of the SEG's 104 ms;
    a label map cannot overlap, and costs it one ``max``. Overlap is found here on the lesions'
    bounding boxes only."""
    labels = np.zeros((len(index), rows, columns), dtype=np.uint8)
    overlap = len(lesions) > np.iinfo(np.uint8).max
    drawn: list[tuple[int, int, tuple[slice, slice], np.ndarray]] = []
    for s, lesion in enumerate(lesions, start=1):
        for part in lesion.finding.parts:
            k = index.get(str(part.source.SOPInstanceUID))
            if k is None:
                continue
            mask = outline_mask(part.outline, rows, columns)
            if not mask.any():  # smaller than a pixel: mark the pixel it sits in
                x, y = part.outline.box.centre
                mask[min(int(y), rows - 1), min(int(x), columns - 1)] = True
            box = part.outline.box
            # outline_mask marks nothing outside its box widened by a pixel (or the one pixel
            # at its centre, which lies inside that box too).
            window = (
                slice(max(0, math.floor(box.y_min) - 1), min(rows, math.ceil(box.y_max) + 1)),
                slice(max(0, math.floor(box.x_min) - 1), min(columns, math.ceil(box.x_max) + 1)),
            )
            local = mask[window]
            drawn.append((k, s, window, local))
            if overlap:
                continue
            plane = labels[k][window]
            under = plane[local]
            if np.any((under != 0) & (under != s)):
                overlap = True
            else:
                plane[local] = s
    if not overlap:
        return labels
    stack = np.zeros((len(index), rows, columns, len(lesions)), dtype=bool)
    for k, s, window, local in drawn:
        stack[k, :, :, s - 1][window] |= local
    return stack


def _lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    color = hd.color.CIELabColor.from_rgb(*rgb)
    return (color.l_star, color.a_star, color.b_star)


def _text_box(outline: Outline, rows: int, columns: int) -> tuple[float, float, float, float]:
    """A (left, top, right, bottom) box for a legend next to ``outline``: above it when there is
    room, else below, else over its top; as wide as the outline or a third of the image."""
    box = outline.box
    height = max(10.0, rows / 30.0)
    width = min(float(columns), max(box.x_max - box.x_min, columns / 3.0))
    left = min(max(0.0, box.x_min), columns - width)
    gap = 2.0
    if box.y_min - gap - height >= 0:
        top = box.y_min - gap - height
    elif box.y_max + gap + height <= rows:
        top = box.y_max + gap
    else:
        top = max(0.0, box.y_min)
    return (left, top, left + width, min(float(rows), top + height))


def _voi_transformations(
    refs: Sequence[Dataset],
) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """None (highdicom copies the images' own VOI) when every image has one; else explicit
    windows: each image's own first window, or min-max over its modality values."""
    if all("WindowCenter" in i or "VOILUTSequence" in i for i in refs):
        return None
    if any("VOILUTSequence" in i and "WindowCenter" not in i for i in refs):
        raise ValueError("a series mixes images with a VOI LUT and images with no VOI at all")
    windows: dict[tuple[float, float], list[Dataset]] = {}
    for image in refs:
        centre, width, _ = _window(image)
        windows.setdefault((centre, width), []).append(image)
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=centre,
            window_width=width,
            referenced_images=hd.ReferencedImageSequence(referenced_images=imgs),
        )
        for (centre, width), imgs in windows.items()
    ]


def _modality_values(image: Dataset) -> np.ndarray:
    return np.asarray(apply_modality_lut(image.pixel_array, image), dtype=np.float64)


def _window(image: Dataset) -> tuple[float, float, str]:
    """(centre, width, function) of the image's first window, or a min-max one."""
    if "WindowCenter" in image and "WindowWidth" in image:
        centre, width = image.WindowCenter, image.WindowWidth
        centre = float(centre[0] if isinstance(centre, Sequence) else centre)
        width = float(width[0] if isinstance(width, Sequence) else width)
        function = str(image.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if width > 0 and (width >= 1 or function == "LINEAR_EXACT"):
            return centre, width, function
    values = _modality_values(image)
    lo, hi = float(values.min()), float(values.max())
    return (lo + hi) / 2.0, max(hi - lo, 1.0), "LINEAR_EXACT"


def build_presentation_states(
    findings: Sequence[ReportedFinding],
    images: Mapping[str, Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uids: Mapping[str, str],
    software_versions: str,
    series_number: int = 9903,
    manufacturer: str = _MANUFACTURER,
    manufacturer_model_name: str = _MODEL_NAME,
    device_serial_number: str = "0",
    legend: Legend = default_legend,
    study_attributes: Mapping[str, object] | None = None,
) -> list[hd.pr.GrayscaleSoftcopyPresentationState]:
    """One GSPS per source series outlining the present findings' regions on their images.

    ``images`` maps SOP Instance UID to the source data set (pixels are read only for a source
    without a window); ``sop_instance_uids`` maps each source Series Instance UID to its GSPS's
    SOP Instance UID; ``study_attributes`` the Patient and General Study attributes the SR
    carries (default: the source images'); see the module docstring for the content.
    """
    lesions = _check(findings, images, legend, series_instance_uid, need_pixels=False)
    regions = hd.pr.GraphicLayer(
        "AI_REGIONS",
        order=1,
        description="AI finding outlines and legends",
        display_color=hd.color.CIELabColor(*_lab(_OUTLINE_RGB)),
    )
    legend_layer = hd.pr.GraphicLayer(
        "AI_LEGEND",
        order=2,
        description=NOT_FOR_DIAGNOSIS,
        display_color=hd.color.CIELabColor(*_lab(_NFD_RGB)),
    )
    out = []
    for number, (series_uid, refs) in enumerate(_by_series(lesions, images).items(), start=1):
        sop_uid = _sop_uid(sop_instance_uids, series_uid, "source series")
        photometric = {str(i.get("PhotometricInterpretation", "")) for i in refs}
        if not photometric <= {"MONOCHROME1", "MONOCHROME2"} or len(photometric) != 1:
            raise ValueError(
                f"series {series_uid}: a GSPS needs MONOCHROME1 or MONOCHROME2 images of one "
                f"kind, not {sorted(photometric)}"
            )
        shape = (
            hd.PresentationLUTShapeValues.INVERSE
            if photometric == {"MONOCHROME1"}
            else hd.PresentationLUTShapeValues.IDENTITY
        )
        annotations = []
        layers = [regions]
        nfd = False
        for image in refs:
            uid = str(image.SOPInstanceUID)
            rows, columns = int(image.Rows), int(image.Columns)
            graphics, texts = [], []
            for lesion in lesions:
                for part in lesion.finding.parts:
                    if str(part.source.SOPInstanceUID) != uid:
                        continue
                    nfd = nfd or lesion.finding.algorithm.not_for_diagnosis
                    points = np.asarray(part.outline.points, dtype=np.float64)
                    tracking_id = lesion.tracking_id
                    tracking_uid = lesion_tracking_uid(lesion.finding)
                    graphics.append(
                        hd.pr.GraphicObject(
                            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                            graphic_data=points,
                            units=hd.pr.AnnotationUnitsValues.PIXEL,
                            tracking_id=tracking_id,
                            tracking_uid=tracking_uid,
                        )
                    )
                    box = part.outline.box
                    texts.append(
                        hd.pr.TextObject(
                            text_value=lesion.legend,
                            units=hd.pr.AnnotationUnitsValues.PIXEL,
                            bounding_box=_text_box(part.outline, rows, columns),
                            anchor_point=((box.x_min + box.x_max) / 2.0, box.y_min),
                            anchor_point_visible=True,
                            text_justification=hd.pr.TextJustificationValues.LEFT,
                            tracking_id=tracking_id,
                            tracking_uid=tracking_uid,
                        )
                    )
            annotations.append(
                hd.pr.GraphicAnnotation(
                    referenced_images=[image],
                    graphic_layer=regions,
                    graphic_objects=graphics,
                    text_objects=texts,
                )
            )
        if nfd:
            layers.append(legend_layer)
            for image in refs:
                annotations.append(
                    hd.pr.GraphicAnnotation(
                        referenced_images=[image],
                        graphic_layer=legend_layer,
                        text_objects=[
                            hd.pr.TextObject(
                                text_value=NOT_FOR_DIAGNOSIS,
                                units=hd.pr.AnnotationUnitsValues.DISPLAY,
                                bounding_box=(0.02, 0.02, 0.6, 0.07),
                                text_justification=hd.pr.TextJustificationValues.LEFT,
                            )
                        ],
                    )
                )
        uids = {str(image.SOPInstanceUID) for image in refs}
        here = [
            lesion
            for lesion in lesions
            if any(str(p.source.SOPInstanceUID) in uids for p in lesion.finding.parts)
        ]
        pr = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=refs,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions,
            device_serial_number=device_serial_number,
            content_label="AI_REGIONS",
            content_description=_description(here)[:64],
            graphic_annotations=annotations,
            graphic_layers=layers,
            voi_lut_transformations=_voi_transformations(refs),
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                presentation_lut_shape=shape
            ),
            series_description=_description(lesions),
            # The legends may hold characters beyond ASCII (the em dash).
            specific_character_set="ISO_IR 192",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        # General Series (C.7.3.1): Laterality is type 2C; the source's, or empty if unknown.
        pr.Laterality = _laterality(refs) or ""
        _study(pr, study_attributes)
        out.append(pr)
    return out


def _windowed(image: Dataset) -> np.ndarray:
    """The image as 8-bit grayscale as a viewer shows it by default: modality LUT, the first
    window (PS3.3 C.11.2.1.2) or min-max, MONOCHROME1 inverted (so dark means low P-value)."""
    values = _modality_values(image)
    centre, width, function = _window(image)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    elif function == "LINEAR_EXACT":
        out = (values - (centre - width / 2.0)) / width
    else:  # LINEAR, C.11.2.1.2.1
        out = (values - (centre - 0.5)) / (width - 1.0) + 0.5
    gray = np.clip(np.round(np.clip(out, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    if str(image.PhotometricInterpretation) == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _font(size: int, path: Path | None = None) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font, or the font file ``path`` laid out with raqm (HarfBuzz and
    FriBiDi), which shapes complex scripts: Devanagari's vowel signs and conjuncts are placed
    and joined, not drawn one code point after another."""
    if path is None:
        return ImageFont.load_default(size=size)
    return _script_font(str(path), size)


@functools.cache
def _script_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.RAQM)


def _wrap(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: float,
) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` (a lone long word stays)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _font_size(rows: int, columns: int) -> int:
    return max(10, min(rows, columns) // 40)


def _line_height(size: int, script: bool = False) -> int:
    """A text line's height: Pillow's font, or a script font, whose marks above and below the
    line (Devanagari's vowel signs) need more."""
    return round(size * (1.7 if script else 1.3)) + 2


#: A line burned into a Secondary Capture: its text, whether it is the not-for-diagnosis line
#: (drawn in red), and the font file of its script (None: Pillow's font, for English).
BurnedLine = tuple[str, bool, Path | None]


def _burn(
    image: Dataset, parts: Sequence[tuple[_Lesion, Outline]], lines: Sequence[BurnedLine]
) -> np.ndarray:
    """The windowed image as RGB with ``parts`` outlined and ``lines`` written at the top."""
    rows, columns = int(image.Rows), int(image.Columns)
    gray = _windowed(image)
    picture = Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")
    draw = ImageDraw.Draw(picture)
    size = _font_size(rows, columns)
    font = _font(size)
    thickness = max(1, min(rows, columns) // 300)
    # The lines at the top, wrapped to the width: (text, is it NFD, font, line height).
    band: list[tuple[str, bool, ImageFont.FreeTypeFont | ImageFont.ImageFont, int]] = []
    for text, is_nfd, font_path in lines:
        line_font = font if font_path is None else _font(size, font_path)
        height = _line_height(size, script=font_path is not None)
        if font_path is None:
            text = _ascii_dashes(text)
        band += [
            (line, is_nfd, line_font, height) for line in _wrap(draw, text, line_font, columns - 8)
        ]
    band_bottom = 4 + sum(height for *_, height in band)
    for lesion, outline in parts:
        # A pixel's centre is at SCOORD (c + 0.5, r + 0.5); PIL addresses pixels by index.
        points = [(x - 0.5, y - 0.5) for x, y in outline.points]
        draw.line(points, fill=_OUTLINE_RGB, width=thickness, joint="curve")
        box = outline.box
        tag = lesion.label  # "Pulmonary nodule 1": the legend line at the top says the rest
        # Above the region, unless that is under the lines at the top: then below it.
        above = box.y_min - _line_height(size)
        tag_y = above if above >= band_bottom else box.y_max
        draw.text(
            (max(0.0, box.x_min), tag_y),
            tag,
            fill=_OUTLINE_RGB,
            font=font,
            stroke_width=1,
            stroke_fill=_STROKE_RGB,
        )
    y = 4
    for line, is_nfd, line_font, height in band:
        draw.text(
            (4, y),
            line,
            fill=_NFD_RGB if is_nfd else _TEXT_RGB,
            font=line_font,
            stroke_width=1,
            stroke_fill=_STROKE_RGB,
        )
        y += height
    return np.asarray(picture, dtype=np.uint8)


def _ascii_dashes(text: str) -> str:
    """Pillow's default font has no dashes beyond ASCII's: they would burn in as boxes."""
    return text.replace("\u2014", "-").replace("\u2013", "-")


def _patient_orientation(image: Dataset) -> tuple[str, str] | None:
    """The image's Patient Orientation, or the one closest to its Image Orientation (Patient)."""
    value = image.get("PatientOrientation")
    if value and len(value) == 2 and all(str(v) for v in value):
        return (str(value[0]), str(value[1]))
    cosines = image.get("ImageOrientationPatient")
    if not cosines or len(cosines) != 6:
        return None
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    out = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        out.append(letters[axis][1 if float(vector[axis]) > 0 else 0])
    return (out[0], out[1])


def _lines(
    here: Sequence[_Lesion], nfd: bool, language: Language | None, font: Path | None
) -> list[BurnedLine]:
    """The lines burned into a Secondary Capture: "NOT FOR DIAGNOSIS" first when it applies,
    then each lesion's legend; then, with ``language`` and a ``font`` that draws it, the same
    in that language."""
    lines: list[BurnedLine] = [(NOT_FOR_DIAGNOSIS, True, None)] if nfd else []
    lines += [(lesion.legend, False, None) for lesion in here]
    if language is None or font is None:  # English names no font: nothing more to burn
        return lines
    if nfd:
        lines.append((language.term("not_for_diagnosis"), True, font))
    lines += [
        (finding_line(language, lesion.finding, lesion.number), False, font) for lesion in here
    ]
    return lines


def build_secondary_captures(
    findings: Sequence[ReportedFinding],
    images: Mapping[str, Dataset],
    *,
    series_instance_uid: str,
    sop_instance_uids: Mapping[str, str],
    software_versions: str,
    series_number: int = 9904,
    manufacturer: str = _MANUFACTURER,
    manufacturer_model_name: str = _MODEL_NAME,
    legend: Legend = default_legend,
    study_attributes: Mapping[str, object] | None = None,
    language: Language | None = None,
    font_dirs: Sequence[Path] | None = None,
) -> list[hd.sc.SCImage]:
    """One RGB Secondary Capture per source image with a part, regions and legend burned in;
    with ``language``, the legend and NOT FOR DIAGNOSIS in that language too, below the
    English, when one of its ``burn_fonts`` is installed under ``font_dirs`` (default: the
    system's font folders, ``languages.FONT_DIRS``; else English
    alone; ``nidaan serve`` warns of it at start).

    ``images`` maps SOP Instance UID to the full source data set (pixels needed);
    ``sop_instance_uids`` maps each such source SOP Instance UID to its SC's SOP Instance UID;
    ``study_attributes`` the Patient and General Study attributes the SR carries (default: the
    source image's); see the module docstring for the content. Image Comments repeats the text
    burned in (each lesion's tag, then the lines at the top), for systems that read text.
    """
    lesions = _check(findings, images, legend, series_instance_uid, need_pixels=True)
    description = _description(lesions)
    font = language.burn_font(font_dirs) if language is not None else None
    out = []
    sources = [image for refs in _by_series(lesions, images).values() for image in refs]
    for number, image in enumerate(sources, start=1):
        uid = str(image.SOPInstanceUID)
        sop_uid = _sop_uid(sop_instance_uids, uid, "source image")
        parts = [
            (lesion, part.outline)
            for lesion in lesions
            for part in lesion.finding.parts
            if str(part.source.SOPInstanceUID) == uid
        ]
        here = list(dict.fromkeys(lesion for lesion, _ in parts))
        nfd = any(lesion.finding.algorithm.not_for_diagnosis for lesion in here)
        lines = _lines(here, nfd, language, font)
        pixels = _burn(image, parts, lines)
        orientation = _patient_orientation(image)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=image,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions,
            patient_orientation=orientation or ("L", "F"),
            series_description=description,
            specific_character_set="ISO_IR 192",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        if orientation is None:
            sc["PatientOrientation"].value = None  # type 2C: unknown, present and empty
        sc.Laterality = _laterality([image]) or ""
        if image.get("ImageLaterality"):
            sc.ImageLaterality = image.ImageLaterality
        sc.BurnedInAnnotation = "YES"
        sc.DerivationDescription = (
            "Source image windowed to 8 bits; AI regions and legend burned in"
        )
        reference = Dataset()
        reference.ReferencedSOPClassUID = image.SOPClassUID
        reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
        purpose = codes.DCM.SourceImageForImageProcessingOperation
        reference.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept(purpose.value, purpose.scheme_designator, purpose.meaning)
        ]
        sc.SourceImageSequence = [reference]
        burned = [lesion.label for lesion in here] + [
            _ascii_dashes(text) if path is None else text for text, _, path in lines
        ]
        sc.ImageComments = "\n".join(burned)
        _study(sc, study_attributes)
        out.append(sc)
    return out
