"""The region writers (SEG, GSPS, SC) on real headers and synthetic pixels, checked against
independent computations and by dicom3tools' dciodvfy."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from nidaan.core.findings import (
    AlgorithmInfo,
    CodedValue,
    Finding,
    ImageAnalysis,
    LesionPart,
    Outline,
    ReportedFinding,
)
from nidaan.pacs_bridge.languages import Language, load_language
from nidaan.pacs_bridge.lesions import group_findings
from nidaan.pacs_bridge.overlays import (
    NOT_FOR_DIAGNOSIS,
    build_presentation_states,
    build_secondary_captures,
    build_segmentations,
    default_legend,
    legend_in,
    overlay_uids,
)
from nidaan.pacs_bridge.overlays import _windowed as _windowed  # what a viewer shows of the image
from nidaan.pacs_bridge.reports import build_report, report_uids

from factory import sample_file, synthetic_ct_series, synthetic_cxr
from srutil import dciodvfy_errors, walk

SYNTHETIC = AlgorithmInfo(
    "Demo CXR screen", "0.1.0", "Nidaan project", trained_on_synthetic_data=True, model="cxr_screen"
)
NODULE = CodedValue("786838002", "SCT", "Pulmonary nodule")
OPACITY = CodedValue("112033", "DCM", "Abnormal opacity")
#: A concave polygon on a 300 x 200 image whose vertices avoid pixel centres and half-pixels, so
#: no pixel centre lies on an edge and "inside" has one answer.
CONCAVE = (
    (20.3, 30.7),
    (150.2, 40.1),
    (90.6, 120.4),
    (170.9, 260.3),
    (30.1, 280.8),
    (60.4, 150.2),
    (20.3, 30.7),
)
#: A rectangle on whole-pixel corners: exactly rows 200..229, columns 100..139 are inside.
RECTANGLE = ((100.0, 200.0), (140.0, 200.0), (140.0, 230.0), (100.0, 230.0), (100.0, 200.0))


def _finding(
    parts: list[tuple[Dataset, tuple[tuple[float, float], ...]]],
    *,
    label: str = "nodule",
    code: CodedValue = NODULE,
    key: str = "k",
    present: bool = True,
) -> ReportedFinding:
    sources = tuple(ds for ds, _ in parts)
    return ReportedFinding(
        SYNTHETIC,
        label,
        code,
        threshold=0.38,
        probability=0.87 if present else 0.1,
        present=present,
        sources=sources,
        key=key,
        parts=tuple(LesionPart(ds, Outline(points), 0.87) for ds, points in parts),
    )


def _images(*datasets: Dataset) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _kwargs(kind: str, sources: list[str]) -> dict:
    series, sops = overlay_uids(kind, "test-key", sources)
    return {"series_instance_uid": series, "sop_instance_uids": sops, "software_versions": "0.1.0"}


def _series_kwargs(kind: str, *datasets: Dataset) -> dict:
    return _kwargs(kind, sorted({str(ds.SeriesInstanceUID) for ds in datasets}))


def _valid(ds: Dataset, path: Path) -> Dataset:
    """Write ``ds`` as a Part 10 file, check it with dciodvfy, and read it back."""
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


def _inside(points: tuple[tuple[float, float], ...], x: float, y: float) -> bool:
    """Brute-force even-odd point in polygon (W. R. Franklin's PNPOLY)."""
    inside = False
    for (xa, ya), (xb, yb) in zip(points[:-1], points[1:], strict=True):
        if (ya > y) != (yb > y) and x < xa + (y - ya) * (xb - xa) / (yb - ya):
            inside = not inside
    return inside


def _expected_mask(points: tuple[tuple[float, float], ...], rows: int, columns: int) -> np.ndarray:
    return np.array(
        [[_inside(points, c + 0.5, r + 0.5) for c in range(columns)] for r in range(rows)]
    )


def _frames_by_segment(seg: Dataset) -> dict[int, list[tuple[str, np.ndarray]]]:
    """Segment number -> (source SOP Instance UID, frame) of each frame, read from the file."""
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    out: dict[int, list[tuple[str, np.ndarray]]] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        # Per frame, or shared by all frames when there is one segment.
        identification = item.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        number = int(identification[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out.setdefault(number, []).append((str(source), frame))
    return out


def test_seg_masks_are_the_pixel_centres_inside_each_outline(tmp_path: Path) -> None:
    cxr, _ = synthetic_cxr(1, rows=300, columns=200)
    concave = _finding([(cxr, CONCAVE)], key="a")
    rectangle = _finding([(cxr, RECTANGLE)], label="opacity", code=OPACITY, key="b")
    (seg,) = build_segmentations([concave, rectangle], _images(cxr), **_series_kwargs("seg", cxr))
    seg = _valid(seg, tmp_path / "seg.dcm")

    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == cxr.StudyInstanceUID
    assert seg.SeriesInstanceUID != cxr.SeriesInstanceUID
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    # The lesions' names as the SR's Tracking Identifiers give them (never "nodule", "tb").
    assert [segments[n].SegmentLabel for n in (1, 2)] == [
        "Pulmonary nodule 1",
        "Abnormal opacity (TB-like) 1",
    ]
    for number, code in ((1, NODULE), (2, OPACITY)):
        segment = segments[number]
        prop = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (code.value, code.scheme)
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == SYNTHETIC.name

    frames = _frames_by_segment(seg)
    assert set(frames) == {1, 2}
    for number, points in ((1, CONCAVE), (2, RECTANGLE)):
        ((source, frame),) = frames[number]
        assert source == cxr.SOPInstanceUID
        expected = _expected_mask(points, 300, 200)
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(frame.astype(bool), expected)
    rectangle_frame = frames[2][0][1].astype(bool)
    assert rectangle_frame.sum() == 30 * 40
    assert rectangle_frame[200:230, 100:140].all()


#: Disjoint from RECTANGLE; and a triangle smaller than a pixel, around pixel (row 50, col 10).
BESIDE = ((150.0, 200.0), (190.0, 200.0), (190.0, 230.0), (150.0, 230.0), (150.0, 200.0))
SPECK = ((10.1, 50.1), (10.3, 50.1), (10.2, 50.3), (10.1, 50.1))


@pytest.mark.parametrize("overlapping", [True, False], ids=["overlapping", "disjoint"])
def test_each_segment_holds_its_own_lesion_whether_or_not_lesions_overlap(
    tmp_path: Path, overlapping: bool
) -> None:
    """Disjoint lesions are written from a label map, overlapping ones from a stack of planes
    (``_segment_masks``); either way every segment must hold exactly its own lesion, and the SEG
    must say whether segments overlap (PS3.3 C.8.20.2, Segments Overlap)."""
    # Two slices of one CT series: a radiograph has no frame of reference, so one SEG can
    # hold one of them only.
    (first, second), _ = synthetic_ct_series(3, slices=2, size=300)
    outlines = [RECTANGLE, CONCAVE if overlapping else BESIDE, SPECK]
    findings = [
        _finding([(first, RECTANGLE), (second, BESIDE)], key="a"),
        _finding([(first, outlines[1])], label="opacity", code=OPACITY, key="b"),
        _finding([(second, SPECK)], key="c"),
    ]
    (seg,) = build_segmentations(findings, _images(first, second), **_series_kwargs("seg", first))
    seg = _valid(seg, tmp_path / "seg.dcm")
    assert seg.SegmentsOverlap == ("YES" if overlapping else "NO")
    frames = _frames_by_segment(seg)
    speck = np.zeros((300, 300), dtype=bool)
    speck[50, 10] = True
    expected = {
        1: {
            str(first.SOPInstanceUID): _expected_mask(RECTANGLE, 300, 300),
            str(second.SOPInstanceUID): _expected_mask(BESIDE, 300, 300),
        },
        2: {str(first.SOPInstanceUID): _expected_mask(outlines[1], 300, 300)},
        3: {str(second.SOPInstanceUID): speck},
    }
    assert {n: sorted(s for s, _ in f) for n, f in frames.items()} == {
        n: sorted(e) for n, e in expected.items()
    }
    for number, by_source in expected.items():
        for source, frame in frames[number]:
            np.testing.assert_array_equal(frame.astype(bool), by_source[source])


def _two_image_series(monochrome1: bool) -> list[Dataset]:
    """Two images of one series: the real MONOCHROME1 chest radiograph (pydicom-data's RG1,
    Window 15000/30000) and a copy of it, or a MONOCHROME2 CT series (no window)."""
    if monochrome1:
        first = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
        assert first.PhotometricInterpretation == "MONOCHROME1"
        second = copy.deepcopy(first)
        second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        second.InstanceNumber = int(first.get("InstanceNumber", 1) or 1) + 1
        return [first, second]
    slices, _ = synthetic_ct_series(2, slices=2, size=256)
    assert slices[0].PhotometricInterpretation == "MONOCHROME2"
    return slices


@pytest.mark.parametrize("monochrome1", [True, False], ids=["MONOCHROME1", "MONOCHROME2"])
def test_gsps_outlines_only_the_image_with_a_part(tmp_path: Path, monochrome1: bool) -> None:
    images = _two_image_series(monochrome1)
    marked, unmarked = images[1], images[0]
    points = ((40.25, 30.5), (120.75, 40.0), (90.5, 110.25), (40.25, 30.5))
    finding = _finding([(marked, points)])
    (pr,) = build_presentation_states([finding], _images(*images), **_series_kwargs("pr", marked))
    pr = _valid(pr, tmp_path / "pr.dcm")

    assert pr.StudyInstanceUID == marked.StudyInstanceUID
    (series,) = pr.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == marked.SeriesInstanceUID
    refs = [item.ReferencedSOPInstanceUID for item in series.ReferencedImageSequence]
    assert refs == [marked.SOPInstanceUID]
    assert unmarked.SOPInstanceUID not in str(pr)

    outlines = [
        (annotation, graphic)
        for annotation in pr.GraphicAnnotationSequence
        for graphic in annotation.get("GraphicObjectSequence", [])
    ]
    ((annotation, graphic),) = outlines
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == marked.SOPInstanceUID
    assert graphic.GraphicType == "POLYLINE"
    assert graphic.GraphicAnnotationUnits == "PIXEL"
    assert [float(v) for v in graphic.GraphicData] == [c for p in points for c in p]
    texts = [
        str(text.UnformattedTextValue)
        for annotation in pr.GraphicAnnotationSequence
        for text in annotation.get("TextObjectSequence", [])
    ]
    assert (
        "Pulmonary nodule 1: 0.87 (threshold 0.38) — cxr_screen 0.1.0 — NOT FOR DIAGNOSIS" in texts
    )
    assert NOT_FOR_DIAGNOSIS in texts
    assert {layer.GraphicLayer for layer in pr.GraphicLayerSequence} == {"AI_REGIONS", "AI_LEGEND"}

    assert pr.PresentationLUTShape == ("INVERSE" if monochrome1 else "IDENTITY")
    (voi,) = pr.SoftcopyVOILUTSequence
    if monochrome1:  # the source's own window
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (15000.0, 30000.0)
    else:  # no window in the CT header: a min-max one over its HU values
        hu = marked.pixel_array * float(marked.RescaleSlope) + float(marked.RescaleIntercept)
        assert float(voi.WindowWidth) == pytest.approx(hu.max() - hu.min())
        assert float(voi.WindowCenter) == pytest.approx((hu.max() + hu.min()) / 2)


def test_secondary_capture_burns_outline_and_legend_into_a_windowed_copy(tmp_path: Path) -> None:
    cxr, _ = synthetic_cxr(3, rows=300, columns=200, monochrome1=True)
    points = ((60.3, 170.2), (150.7, 180.6), (120.4, 250.9), (60.3, 170.2))
    finding = _finding([(cxr, points)])
    (sc,) = build_secondary_captures(
        [finding], _images(cxr), **_kwargs("sc", [str(cxr.SOPInstanceUID)])
    )
    sc = _valid(sc, tmp_path / "sc.dcm")

    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB"
    assert (sc.StudyInstanceUID, sc.PatientID) == (cxr.StudyInstanceUID, cxr.PatientID)
    assert sc.SeriesInstanceUID != cxr.SeriesInstanceUID
    (source,) = sc.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == cxr.SOPInstanceUID
    assert source.ReferencedSOPClassUID == cxr.SOPClassUID

    # The plain image as a viewer shows it: window 2048/4096 (LINEAR, PS3.3 C.11.2.1.2.1),
    # MONOCHROME1 inverted.
    stored = cxr.pixel_array.astype(np.float64)
    linear = np.clip((stored - 2047.5) / 4095.0 + 0.5, 0.0, 1.0)
    plain = 255 - np.round(linear * 255.0).astype(np.int64)
    rgb = sc.pixel_array.astype(np.int64)
    assert rgb.shape == (300, 200, 3)
    changed = (rgb != plain[..., None]).any(axis=-1)

    near = np.zeros_like(changed)
    near[170 - 25 : 251 + 5, 60 - 5 : 151 + 5] = True  # the outline, and its number above it
    band = np.zeros_like(changed)
    band[:80] = True  # the legend lines at the top
    assert not (changed & ~near & ~band).any()
    assert changed[:80].any()  # text was written
    assert changed[near].sum() > 100  # the outline was drawn
    # The first edge crosses column 100's centre line at y = 174.8 (row 174): yellow there.
    assert any(tuple(rgb[r, 100]) == (255, 255, 0) for r in (173, 174, 175))
    # Inside the outline, far from its edges, the image is untouched.
    assert not changed[200:210, 105:115].any()


def test_two_lesions_on_two_series_give_two_segs_and_two_gsps(tmp_path: Path) -> None:
    cxr, _ = synthetic_cxr(4, rows=300, columns=200)
    slices, _ = synthetic_ct_series(
        5, slices=4, size=128, study_uid=str(cxr.StudyInstanceUID), patient=cxr
    )
    box = ((30.5, 40.5), (70.25, 40.5), (70.25, 80.75), (30.5, 80.75), (30.5, 40.5))
    on_cxr = _finding([(cxr, CONCAVE)], key="cxr")
    on_ct = _finding([(slices[1], box), (slices[2], box)], key="ct")
    images = _images(cxr, *slices)

    segs = build_segmentations([on_cxr, on_ct], images, **_series_kwargs("seg", cxr, slices[0]))
    prs = build_presentation_states([on_cxr, on_ct], images, **_series_kwargs("pr", cxr, *slices))
    assert len(segs) == 2 and len(prs) == 2
    assert len({s.SOPInstanceUID for s in segs}) == 2
    assert len({s.SeriesInstanceUID for s in segs}) == 1  # one new series of SEGs

    by_series = {}
    for k, seg in enumerate(segs):
        seg = _valid(seg, tmp_path / f"seg{k}.dcm")
        (series,) = seg.ReferencedSeriesSequence
        by_series[series.SeriesInstanceUID] = seg
    assert set(by_series) == {cxr.SeriesInstanceUID, slices[0].SeriesInstanceUID}
    ct_seg = by_series[slices[0].SeriesInstanceUID]
    assert len(ct_seg.SegmentSequence) == 1
    frames = _frames_by_segment(ct_seg)[1]
    assert [uid for uid, _ in frames] == [slices[1].SOPInstanceUID, slices[2].SOPInstanceUID]
    expected = _expected_mask(box, 128, 128)
    for _, frame in frames:
        np.testing.assert_array_equal(frame.astype(bool), expected)
    assert len(by_series[cxr.SeriesInstanceUID].SegmentSequence) == 1

    for k, pr in enumerate(prs):
        pr = _valid(pr, tmp_path / f"pr{k}.dcm")
        (series,) = pr.ReferencedSeriesSequence
        refs = {item.ReferencedSOPInstanceUID for item in series.ReferencedImageSequence}
        if series.SeriesInstanceUID == cxr.SeriesInstanceUID:
            assert refs == {cxr.SOPInstanceUID}
        else:
            assert refs == {slices[1].SOPInstanceUID, slices[2].SOPInstanceUID}

    scs = build_secondary_captures(
        [on_cxr, on_ct],
        images,
        **_kwargs("sc", [str(d.SOPInstanceUID) for d in (cxr, slices[1], slices[2])]),
    )
    assert len(scs) == 3
    for k, sc in enumerate(scs):
        _valid(sc, tmp_path / f"sc{k}.dcm")


def test_the_same_input_gives_the_same_uids() -> None:
    cxr, _ = synthetic_cxr(6, rows=300, columns=200)
    finding = _finding([(cxr, CONCAVE)])
    first = build_segmentations([finding], _images(cxr), **_series_kwargs("seg", cxr))[0]
    again = build_segmentations([finding], _images(cxr), **_series_kwargs("seg", cxr))[0]
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.SegmentSequence[0].TrackingUID == again.SegmentSequence[0].TrackingUID


BUILDERS = {
    "seg": build_segmentations,
    "pr": build_presentation_states,
    "sc": build_secondary_captures,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize(
    "problem",
    ["nothing present", "source missing", "outside the image", "two studies", "no sop uid"],
)
def test_input_that_cannot_make_an_object_is_refused(kind: str, problem: str) -> None:
    cxr, _ = synthetic_cxr(7, rows=300, columns=200)
    other, _ = synthetic_cxr(8, rows=300, columns=200)
    images = _images(cxr, other)
    findings = [_finding([(cxr, CONCAVE)])]
    if problem == "nothing present":
        findings = [
            ReportedFinding(SYNTHETIC, "nodule", NODULE, 0.38, 0.1, False, (cxr,), "absent"),
            ReportedFinding(SYNTHETIC, "opacity", OPACITY, 0.38, 0.9, True, (cxr,), "no region"),
        ]
        match = "no present finding"
    elif problem == "source missing":
        del images[str(cxr.SOPInstanceUID)]
        match = "not among the images"
    elif problem == "outside the image":
        findings = [
            _finding([(cxr, ((150.0, 250.0), (201.0, 250.0), (180.0, 290.0), (150.0, 250.0)))])
        ]
        match = "outside the 200x300 image"
    elif problem == "two studies":
        findings.append(_finding([(other, CONCAVE)], key="other"))
        match = "2 studies"
    else:
        match = "no SOP Instance UID"
    sources = [str(cxr.SOPInstanceUID)] if kind == "sc" else [str(cxr.SeriesInstanceUID)]
    if problem == "two studies":
        sources += [str(other.SOPInstanceUID), str(other.SeriesInstanceUID)]
    kwargs = _kwargs(kind, [] if problem == "no sop uid" else sources)
    with pytest.raises(ValueError, match=match):
        BUILDERS[kind](findings, images, **kwargs)


def test_highdicom_reads_the_seg_back() -> None:
    cxr, _ = synthetic_cxr(9, rows=300, columns=200)
    (seg,) = build_segmentations(
        [_finding([(cxr, CONCAVE)])], _images(cxr), **_series_kwargs("seg", cxr)
    )
    parsed = hd.seg.Segmentation.from_dataset(copy.deepcopy(seg))
    assert parsed.number_of_segments == 1
    assert parsed.get_source_image_uids()[0][2] == cxr.SOPInstanceUID


def test_secondary_capture_of_the_real_monochrome1_radiograph(tmp_path: Path) -> None:
    (cxr,) = _two_image_series(monochrome1=True)[:1]
    points = ((600.5, 700.25), (1200.75, 650.5), (1000.25, 1300.5), (600.5, 700.25))
    (sc,) = build_secondary_captures(
        [_finding([(cxr, points)])], _images(cxr), **_kwargs("sc", [str(cxr.SOPInstanceUID)])
    )
    sc = _valid(sc, tmp_path / "sc.dcm")
    assert (sc.Rows, sc.Columns) == (cxr.Rows, cxr.Columns)
    assert list(sc.PatientOrientation) == list(cxr.PatientOrientation)
    # MONOCHROME1 inverted: the air outside the body (high stored values) is dark.
    gray = sc.pixel_array[..., 0]
    stored = cxr.pixel_array
    assert gray[stored >= np.percentile(stored, 99)].mean() < 64


def test_a_second_language_legend_is_carried_in_utf8(tmp_path: Path) -> None:
    """The presentation state's legend in English and the peer's language (ISO_IR 192)."""
    images = _two_image_series(False)
    points = ((40.25, 30.5), (120.75, 40.0), (90.5, 110.25), (40.25, 30.5))
    finding = _finding([(images[0], points)])
    (pr,) = build_presentation_states(
        [finding],
        _images(*images),
        legend=legend_in(load_language("hi")),
        **_series_kwargs("pr", images[0]),
    )
    pr = _valid(pr, tmp_path / "pr.dcm")
    back = pydicom.dcmread(tmp_path / "pr.dcm")
    assert back.SpecificCharacterSet == "ISO_IR 192"
    texts = [
        str(text.UnformattedTextValue)
        for annotation in back.GraphicAnnotationSequence
        for text in annotation.get("TextObjectSequence", [])
    ]
    (legend,) = [t for t in texts if t.startswith("Pulmonary nodule 1")]
    assert legend.endswith(
        "/ फेफड़े की गांठ (पल्मोनरी नोड्यूल) 1: संभावना 0.87 (सीमा 0.38) — निदान के लिए नहीं"
    )
    assert legend_in(None) is default_legend


def test_the_secondary_capture_burns_the_peers_language_below_the_english(tmp_path: Path) -> None:
    """For a Hindi peer the SC keeps the English lines and adds the same in Hindi below them,
    drawn with an installed Devanagari font (every character of it has a glyph there, not the
    font's empty box); Image Comments carries both. With no such font: English alone."""
    from PIL import ImageFont

    cxr, _ = synthetic_cxr(3, rows=400, columns=400)
    points = ((60.3, 250.2), (150.7, 260.6), (120.4, 330.9), (60.3, 250.2))
    finding = _finding([(cxr, points)])
    kwargs = _kwargs("sc", [str(cxr.SOPInstanceUID)])
    hindi = load_language("hi")
    (english,) = build_secondary_captures([finding], _images(cxr), **kwargs)
    (both,) = build_secondary_captures([finding], _images(cxr), language=hindi, **kwargs)
    (fallback,) = build_secondary_captures(
        [finding], _images(cxr), language=hindi, font_dirs=[tmp_path], **kwargs
    )
    both = _valid(both, tmp_path / "sc.dcm")

    line = "फेफड़े की गांठ (पल्मोनरी नोड्यूल) 1: संभावना 0.87 (सीमा 0.38)"
    comments = str(both.ImageComments).split("\n")
    assert comments[: len(str(english.ImageComments).split("\n"))] == str(
        english.ImageComments
    ).split("\n")
    assert comments[-2:] == ["निदान के लिए नहीं", line]
    assert "संभावना" not in str(english.ImageComments)

    # The English lines are the same in both; the Hindi ones are drawn below them, well above
    # the region (its tag starts near row 235), and nothing else differs.
    a, b = english.pixel_array.astype(int), both.pixel_array.astype(int)
    plain = _windowed(cxr)[..., None]
    english_rows = np.nonzero((a != plain).any(axis=(1, 2))[:200])[0]
    differs = (a != b).any(axis=(1, 2))
    first, last = np.nonzero(differs)[0][[0, -1]]
    assert english_rows[-1] - 3 <= first and last < 200, (english_rows[-1], first, last)
    assert differs[first:last].mean() > 0.5  # lines of text, not a stray pixel
    assert not differs[: english_rows[-1] - 3].any()
    # With no Devanagari font installed: the English SC's pixels exactly (under its own UIDs).
    assert np.array_equal(fallback.pixel_array, english.pixel_array)
    assert "संभावना" not in str(fallback.ImageComments)

    font_path = hindi.burn_font()
    assert font_path is not None
    font = ImageFont.truetype(str(font_path), 20)
    missing = bytes(font.getmask("\uffff"))  # what the font draws for a character it lacks
    lacking = {c for c in line + "निदान के लिए नहीं" if not c.isspace() and c.isprintable()}
    lacking = {c for c in lacking if bytes(font.getmask(c)) == missing}
    assert not lacking, f"the burn font has no glyph for {sorted(lacking)}"


def test_a_region_under_the_legend_lines_has_its_tag_below_it() -> None:
    """A region whose top is within reach of the lines at the top (more of them for a Hindi
    peer): its tag ("Pulmonary nodule 1") goes below the region, never under those lines;
    where the lines leave room, above it as before."""
    cxr, _ = synthetic_cxr(5, rows=400, columns=400)
    points = ((100.5, 80.5), (200.5, 85.5), (150.5, 160.5), (100.5, 80.5))
    finding = _finding([(cxr, points)])
    kwargs = _kwargs("sc", [str(cxr.SOPInstanceUID)])
    plain = _windowed(cxr)[..., None]

    def tag_below(language: Language | None) -> bool:
        (sc,) = build_secondary_captures([finding], _images(cxr), language=language, **kwargs)
        changed = (sc.pixel_array != plain).any(axis=-1)
        return bool(changed[163:180, 100:200].sum() > 20)  # text under the region's bottom

    assert not tag_below(None)  # two English lines: room above the region
    assert tag_below(load_language("hi"))  # four lines, the last two taller: below


def _all_text(ds: Dataset) -> list[str]:
    """Every text value a person or a viewer may show, in the data set and its sequences."""
    out = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                out += _all_text(item)
        elif element.VR in ("LO", "LT", "SH", "ST", "UT", "UC", "CS", "PN") and element.value:
            values = element.value if element.VM > 1 else [element.value]
            out += [str(v) for v in values]
    return out


def _objects_of_a_tb_like_opacity() -> tuple[Dataset, list[Dataset]]:
    """The SR (with Hindi) and every region object of a radiograph with a nodule and a TB-like
    opacity, as the demo model labels them internally ("nodule", "tb")."""
    cxr, _ = synthetic_cxr(9, rows=400, columns=300)
    outlines = {
        "nodule": Outline(((40.5, 50.5), (90.5, 50.5), (90.5, 100.5), (40.5, 50.5)), 0.9),
        "tb": Outline(((150.5, 200.5), (250.5, 200.5), (200.5, 300.5), (150.5, 200.5)), 0.8),
    }
    analysis = ImageAnalysis(
        SYNTHETIC,
        cxr,
        (
            Finding("nodule", NODULE, 0.9, 0.38, outlines=(outlines["nodule"],)),
            Finding("tb", OPACITY, 0.8, 0.52, outlines=(outlines["tb"],)),
        ),
    )
    findings = group_findings([analysis])
    series, sop = report_uids(str(cxr.StudyInstanceUID), "tb-test")
    sr = build_report(
        [analysis],
        findings=findings,
        series_instance_uid=series,
        sop_instance_uid=sop,
        device_observer_uid="2.25.77",
        language="hi",
    )
    images = _images(cxr)
    hindi = legend_in(load_language("hi"))
    objects: list[Dataset] = [
        *build_segmentations(findings, images, **_series_kwargs("seg", cxr)),
        *build_presentation_states(findings, images, legend=hindi, **_series_kwargs("pr", cxr)),
        *build_secondary_captures(findings, images, **_kwargs("sc", [str(cxr.SOPInstanceUID)])),
    ]
    return sr, objects


def test_no_object_says_a_models_internal_label() -> None:
    sr, objects = _objects_of_a_tb_like_opacity()
    for ds in [sr, *objects]:
        said = _all_text(ds)
        assert not [t for t in said if re.search(r"\btb\b", t)], (ds.Modality, said)
        assert any("Abnormal opacity (TB-like) 1" in t for t in said), ds.Modality
    (seg, pr, sc) = objects
    assert sorted(s.SegmentLabel for s in seg.SegmentSequence) == [
        "Abnormal opacity (TB-like) 1",
        "Pulmonary nodule 1",
    ]
    # The text burned into the capture is in Image Comments too: the name beside each outline,
    # then the legends.
    assert str(sc.ImageComments).splitlines()[:2] == [
        "Pulmonary nodule 1",
        "Abnormal opacity (TB-like) 1",
    ]
    parameters = [
        str(item.TextValue)
        for item in walk(sr)
        if "TextValue" in item and "is Present when" in str(item.TextValue)
    ]
    assert parameters and all(
        "Abnormal opacity (TB-like)" in p or "Pulmonary nodule" in p for p in parameters
    )


def test_the_seg_names_and_tracks_each_lesion_as_the_sr_does() -> None:
    sr, (seg, pr, _) = _objects_of_a_tb_like_opacity()
    in_sr = {}
    for group in walk(sr):
        items = group.get("ContentSequence", [])
        ids = [str(i.TextValue) for i in items if _concept(i) == "112039"]  # Tracking Identifier
        uids = [str(i.UID) for i in items if _concept(i) == "112040"]  # Tracking Unique Id.
        if ids and uids:
            in_sr[uids[0]] = ids[0]
    in_seg = {str(s.TrackingUID): str(s.TrackingID) for s in seg.SegmentSequence}
    assert (
        in_seg == in_sr == {uid: name for uid, name in in_sr.items() if not name.endswith("absent")}
    )
    assert sorted(in_seg.values()) == ["Abnormal opacity (TB-like) 1", "Pulmonary nodule 1"]
    in_pr = {
        str(g.TrackingUID): str(g.TrackingID)
        for a in pr.GraphicAnnotationSequence
        for g in a.get("GraphicObjectSequence", [])
    }
    assert in_pr == in_seg


def _concept(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence", [])
    return str(names[0].CodeValue) if names else ""
