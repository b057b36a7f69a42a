"""One finding per lesion: regions as outlines (every blob, sharpened to the input's pixels),
grouped across the slices of a CT volume, with their size in mm; Absent once per study."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from nidaan.core.config import InferenceConfig
from nidaan.core.errors import ModelRepositoryError
from nidaan.core.findings import (
    AlgorithmInfo,
    BoundingBox,
    CodedValue,
    Finding,
    ImageAnalysis,
    Outline,
    ReportedFinding,
)
from nidaan.kernels import Placement, refine_outline, regions
from nidaan.pacs_bridge.lesions import group_findings
from nidaan.pacs_bridge.uids import tracking_uid
from nidaan.server.backends import create_backend
from nidaan.server.model_repository import OutlineRule, load_model
from nidaan.server.pipeline import Pipeline

from volumes import Nodule, synthetic_ct_volume

ROOT = Path(__file__).resolve().parents[1]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CODE = CodedValue("786838002", "SCT", "Pulmonary nodule")
MODEL = AlgorithmInfo("Demo", "1.0", model="demo")
OTHER = AlgorithmInfo("Other", "2.0", model="other")


# --- the real model on a synthetic volume ---------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(repository) -> Pipeline:  # type: ignore[no-untyped-def]
    return Pipeline(repository, create_backend(InferenceConfig(), repository))


def test_a_ct_volume_with_two_nodules_gives_one_finding_per_lesion_with_its_size(
    pipeline: Pipeline,
) -> None:
    # Diameters inside the model's trained range (radius 1.4-3.5 % of the 500 mm field of view:
    # 14 to 35 mm across); the larger one lower down, their slices overlapping (16-17), on
    # opposite lungs: adjacency alone must not join them, their boxes do not overlap.
    series, planted = synthetic_ct_volume(
        0, [Nodule(0.45, 0.32, 14, 20.0), Nodule(0.55, 0.68, 21, 28.0)], slices=40
    )
    analyses = pipeline.analyse(series)
    assert len(analyses) == 40
    both = sorted(set(planted[0].slices) & set(planted[1].slices))
    assert both, "the test wants slices that show both nodules"
    for k in both:  # every blob is an outline: two opacities, two regions
        (finding,) = analyses[k].findings
        assert len(finding.outlines) == 2, f"slice {k}"

    reported = group_findings(analyses)
    assert [r.present for r in reported] == [True, True]  # no per-slice Absent, no extra lesion
    for r, p in zip(reported, planted, strict=True):  # superior first: the 20 mm one
        slices = [int(part.source.InstanceNumber) - 1 for part in r.parts]
        assert len(slices) >= 4 and slices == list(range(slices[0], slices[0] + len(slices)))
        assert set(slices) <= set(p.slices) and p.slice in slices
        assert r.sources == tuple(part.source for part in r.parts)
        for part in r.parts:
            box = part.outline.box
            assert box.x_min <= p.column <= box.x_max and box.y_min <= p.row <= box.y_max
        assert r.size_mm is not None
        assert abs(r.size_mm - p.diameter_mm) <= 0.2 * p.diameter_mm, (r.size_mm, p.diameter_mm)
        assert r.probability == max(part.probability for part in r.parts)
    assert len({r.key for r in reported}) == 2


def test_a_revision_with_a_late_slice_keeps_the_lesions_tracking_uid(pipeline: Pipeline) -> None:
    # The nodule's centre is on the series' last slice, which arrives late: the first report
    # sees the lesion on the slices above it only, the revision on one more, its strongest. The
    # same lesion keeps its Tracking UID.
    series, (planted,) = synthetic_ct_volume(3, [Nodule(0.45, 0.32, 15, 20.0)], slices=16)
    first = [r for r in group_findings(pipeline.analyse(series[:-1])) if r.present]
    again = [r for r in group_findings(pipeline.analyse(series)) if r.present]
    assert len(first) == len(again) == 1
    assert series[-1] in again[0].sources and series[-1] not in first[0].sources
    assert len(again[0].parts) == len(first[0].parts) + 1
    assert tracking_uid(again[0].key) == tracking_uid(first[0].key)


# --- outline refinement ---------------------------------------------------------------------------


def test_refined_outline_follows_the_lesion_within_its_cells_not_a_brighter_vessel() -> None:
    p = Placement.fit(512, 512, 256, 256, "letterbox")  # 2 source pixels per input pixel
    channel = np.full((256, 256), 0.3)
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    channel[(yy - 84.0) ** 2 + (xx - 84.0) ** 2 <= 7.0**2] = 0.7  # the nodule: pixels 77..90
    channel[83:86, 84:150] = 0.7  # a vessel leaving it to the right, beyond the blob's cells
    channel[93:95, 85:87] = 0.9  # a brighter vessel dot, apart, in the strongest cell too
    heat = np.zeros((32, 32))
    heat[9:12, 9:12] = 0.6  # input pixels 72..96; grown by a cell, 64..104
    heat[11, 10] = 1.0  # the strongest cell: rows 88..96, columns 80..88
    (blob,) = regions(heat, p, 0.5)
    assert blob.members[0] == (11, 10)
    points = refine_outline(channel, heat.shape, blob, p, 0.5)
    assert points is not None and points[0] == points[-1]
    box = Outline(points).box
    # The nodule's pixels span input 77..91 (source 154..182); the vessel it touches is cut at
    # the grown blob's edge (input 104, source 208); the brighter dot is left out.
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (154.0, 154.0, 208.0, 182.0)
    assert refine_outline(channel, heat.shape, blob, p, 0.95) is None  # nothing that bright


def test_the_ct_sidecar_sharpens_outlines_and_a_bad_outline_rule_is_refused(
    tmp_path: Path,
) -> None:
    spec = load_model(ROOT / "models" / "ct_nodule", check_onnx=False)
    assert spec.findings[0].outline == OutlineRule(channel=0, above=0.634)
    folder = shutil.copytree(ROOT / "models" / "ct_nodule", tmp_path / "ct_nodule")
    sidecar = folder / "nidaan.toml"
    text = sidecar.read_text()
    assert "outline = { channel = 0, above = 0.634 }" in text
    for bad, why in (
        ("{ channel = 2, above = 0.634 }", "channel 2 is outside the input's 2 channels"),
        ("{ channel = 0, above = 1.5 }", "above 1.5 is outside"),
        ("{ channel = 0, above = 0.6, below = 0.9 }", "unknown keys ['below']"),
    ):
        sidecar.write_text(text.replace("{ channel = 0, above = 0.634 }", bad))
        with pytest.raises(ModelRepositoryError, match=re.escape(why)):
            load_model(folder, check_onnx=False)


# --- grouping, on hand-built analyses -------------------------------------------------------------


def _slice(
    study: str,
    series: str,
    z: float,
    *,
    number: int = 1,
    spacing: list[float] | None = None,
) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID, ds.SOPClassUID = generate_uid(), CT_IMAGE
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 512
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.ImagePositionPatient = [-250.0, -250.0, z]
    ds.PixelSpacing = spacing or [1.0, 1.0]
    return ds


def _radiograph(study: str, **spacing: list[float]) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID, ds.SOPClassUID = generate_uid(), DX_IMAGE
    ds.Rows, ds.Columns = 1000, 900
    for keyword, value in spacing.items():
        setattr(ds, keyword, value)
    return ds


def _box(x: float, y: float, w: float = 20.0, h: float = 20.0, peak: float = 0.9) -> Outline:
    return Outline.from_box(BoundingBox(x, y, x + w, y + h), peak)


def _analysis(
    ds: Dataset,
    probability: float,
    *outlines: Outline,
    algorithm: AlgorithmInfo = MODEL,
    label: str = "nodule",
) -> ImageAnalysis:
    finding = Finding(label, CODE, probability, 0.5, outlines=outlines)
    return ImageAnalysis(algorithm, ds, (finding,))


def _numbers(r: ReportedFinding) -> list[int]:
    return [int(part.source.InstanceNumber) for part in r.parts]


def _volume(n: int, study: str | None = None, step: float = 2.5) -> list[Dataset]:
    study, series = study or generate_uid(), generate_uid()
    return [_slice(study, series, -step * k, number=k + 1) for k in range(n)]


def test_overlapping_parts_on_adjacent_slices_are_one_lesion_in_slice_order() -> None:
    s = _volume(4)
    analyses = [
        _analysis(s[0], 0.2),
        _analysis(s[1], 0.7, _box(100, 100, peak=0.7)),
        _analysis(s[2], 0.9, _box(110, 105, peak=0.95)),  # overlaps slice 2's box
        _analysis(s[3], 0.8, _box(115, 110, peak=0.8), _box(300, 300, peak=0.6)),
    ]
    reported = group_findings(analyses[::-1])  # whatever order they come in
    first, second = reported
    assert _numbers(first) == [2, 3, 4] and first.sources == (s[1], s[2], s[3])
    assert first.probability == 0.9  # its strongest image's
    # Keyed by series and the 10 mm cell of patient coordinates its centre lies in: this lesion's
    # (area-weighted) centre is at pixel (118.3, 115) of slices whose first pixel centre is at
    # x = y = -250 mm (1 mm pixels), z -5 mm: (-132.2, -135.5, -5) mm.
    series = s[0].SeriesInstanceUID
    assert first.key.endswith(f"|demo|nodule|{series}|-14|-14|-1")
    assert _numbers(second) == [4] and second.key.endswith(f"|{series}|5|5|-1")


def test_a_late_slice_that_becomes_a_lesions_strongest_part_keeps_its_tracking_uid() -> None:
    # Slices 3-4 first, then slice 5 (the lesion's strongest part) arrives: the lesion's
    # centre moves 1.7 mm down, within its 10 mm cell; its key, once its strongest slice's SOP
    # Instance UID, stays. A second lesion elsewhere keeps its own.
    s = _volume(6)
    other = _analysis(s[0], 0.9, _box(400, 400))
    before = [_analysis(s[2], 0.8, _box(100, 100, peak=0.7)), _analysis(s[3], 0.8, _box(102, 100))]
    after = [*before, _analysis(s[4], 0.95, _box(101, 101, peak=0.99))]
    first = group_findings([other, *before])
    again = group_findings([other, *after])
    assert [len(r.parts) for r in first] == [1, 2] and [len(r.parts) for r in again] == [1, 3]
    assert [tracking_uid(r.key) for r in again] == [tracking_uid(r.key) for r in first]


def test_parts_across_a_gap_are_separate_lesions() -> None:
    s = _volume(6)
    same = _box(100, 100)
    # Slice 2 analysed without the finding between two with it: not neighbours in the finding.
    analysed = [_analysis(s[0], 0.9, same), _analysis(s[1], 0.1), _analysis(s[2], 0.9, same)]
    assert [_numbers(r) for r in group_findings(analysed)] == [[1], [3]]
    # Slice 5 never arrived: 4 and 6 are neighbours in the series but 5 mm apart, twice the
    # spacing (2.5 mm) of its other slices.
    gap = [_analysis(ds, 0.9, same) for ds in (s[0], s[1], s[2], s[3], s[5])]
    assert [_numbers(r) for r in group_findings(gap)] == [[1, 2, 3, 4], [6]]
    # Adjacent slices whose boxes do not overlap (they only touch) are separate lesions too.
    touching = [_analysis(s[0], 0.9, _box(100, 100)), _analysis(s[1], 0.9, _box(120, 100))]
    assert [_numbers(r) for r in group_findings(touching)] == [[1], [2]]


def test_lesions_of_a_volume_are_superior_first_then_right_to_left() -> None:
    s = _volume(6)
    reported = group_findings(
        [
            _analysis(s[4], 0.9, _box(100, 100, peak=0.99)),  # lowest, and the strongest
            _analysis(s[1], 0.8, _box(400, 100), _box(50, 300, peak=0.5)),
        ]
    )
    # Slice 2 is higher (z -2.5) than slice 5 (z -10); on it, column 50 is the patient's right
    # (+x points to the patient's left), so it comes before column 400.
    assert [(_numbers(r), r.parts[0].outline.box.x_min) for r in reported] == [
        ([2], 50.0),
        ([2], 400.0),
        ([5], 100.0),
    ]


def test_a_radiograph_with_two_outlines_gives_two_lesions_top_to_bottom() -> None:
    cr = _radiograph(generate_uid(), ImagerPixelSpacing=[0.2, 0.2])
    lower, upper = _box(100, 600, 50, 50, peak=0.9), _box(500, 100, 100, 50, peak=0.6)
    reported = group_findings([_analysis(cr, 0.8, lower, upper)])  # strongest first
    assert [r.parts[0].outline for r in reported] == [upper, lower]
    assert [r.key.rsplit("|", 1)[1] for r in reported] == ["1", "0"]
    assert all(r.present and r.sources == (cr,) for r in reported)


def test_a_projection_radiograph_gets_no_size_in_mm() -> None:
    # Imager Pixel Spacing is at the detector (the patient is magnified), and a radiograph
    # model's outline is heatmap cells: no size, even with a refined outline or Pixel Spacing.
    for spacing in ({"ImagerPixelSpacing": [0.2, 0.2]}, {"PixelSpacing": [0.2, 0.2]}):
        cr = _radiograph(generate_uid(), **spacing)
        cr.Modality = "DX"
        for refined in (False, True):
            box = Outline.from_box(BoundingBox(100, 100, 200, 150), 0.9, refined=refined)
            (r,) = group_findings([_analysis(cr, 0.8, box)])
            assert r.present and r.parts and r.size_mm is None, (spacing, refined)


def _refined(x: float, y: float, w: float, h: float) -> Outline:
    return Outline.from_box(BoundingBox(x, y, x + w, y + h), 0.9, refined=True)


def test_size_follows_pixel_spacing_rows_then_columns() -> None:
    # Pixel Spacing is [row spacing, column spacing]: rows 0.5 mm apart, columns 2 mm apart. A
    # region 10 columns wide and 4 rows high is 20 mm wide and 2 mm high: sqrt(20^2 + 2^2) mm
    # across (swapped spacings would make it sqrt(5^2 + 8^2) = 9.4 mm).
    ds = _slice(generate_uid(), generate_uid(), 0.0, spacing=[0.5, 2.0])
    ds.Modality = "CT"
    (r,) = group_findings([_analysis(ds, 0.9, _refined(10, 10, 10, 4))])
    assert r.size_mm == pytest.approx(np.hypot(20.0, 2.0))
    # Pixel Spacing wins over Imager Pixel Spacing; without it there is no size.
    ds.ImagerPixelSpacing = [3.0, 3.0]
    (r,) = group_findings([_analysis(ds, 0.9, _refined(10, 10, 10, 4))])
    assert r.size_mm == pytest.approx(np.hypot(20.0, 2.0))
    del ds.PixelSpacing
    (r,) = group_findings([_analysis(ds, 0.9, _refined(10, 10, 10, 4))])
    assert r.size_mm is None


def test_a_ct_lesion_is_sized_only_from_outlines_sharpened_to_the_input_pixels() -> None:
    # A model without an outline rule gives heatmap cells (8 x 8 input pixels): coarse, and
    # no size. One slice of a lesion unrefined: no size either (it could be the widest).
    s = _volume(3)
    (r,) = group_findings([_analysis(s[0], 0.9, _box(10, 10, 10, 4))])
    assert r.parts and r.size_mm is None
    (r,) = group_findings([_analysis(ds, 0.9, _refined(100, 100, 30, 40)) for ds in s])
    assert r.size_mm == pytest.approx(50.0)  # 30 x 40 pixels of 1 mm
    mixed = [_analysis(s[0], 0.9, _refined(100, 100, 30, 40)), _analysis(s[1], 0.9, _box(100, 100))]
    (r,) = group_findings(mixed)
    assert len(r.parts) == 2 and r.size_mm is None


def test_absent_is_stated_once_per_study_and_model_and_only_without_the_finding() -> None:
    study = generate_uid()
    s = _volume(3, study)
    cr = _radiograph(study)
    analyses = [_analysis(ds, p) for ds, p in zip(s, (0.1, 0.3, 0.2), strict=True)]
    analyses += [_analysis(ds, 0.05, algorithm=OTHER) for ds in (*s, cr)]
    reported = group_findings(analyses)
    assert [(r.algorithm.model, r.present) for r in reported] == [("demo", False), ("other", False)]
    demo, other = reported
    assert demo.probability == 0.3 and demo.sources == tuple(s)  # every slice, in slice order
    assert demo.key == f"{study}|demo|nodule|absent" and not demo.parts
    assert len(other.sources) == 4
    # Present on one slice: no Absent for that model and label, one finding for the lesion.
    analyses[1] = _analysis(s[1], 0.7, _box(10, 10))
    reported = group_findings(analyses)
    assert [(r.algorithm.model, r.present) for r in reported] == [("demo", True), ("other", False)]


def test_lesions_come_before_the_models_absent_labels_and_regionless_findings_stand_alone() -> None:
    s = _volume(2)

    def both(ds: Dataset, nodule: float, *outlines: Outline) -> ImageAnalysis:
        findings = (
            Finding("nodule", CODE, nodule, 0.5, outlines=outlines),
            Finding("mass", CodedValue("4147007", "SCT", "Mass"), 0.1, 0.5),
        )
        return ImageAnalysis(MODEL, ds, findings)

    reported = group_findings([both(s[0], 0.9), both(s[1], 0.8)])  # present, no region
    assert [(r.label, r.present, len(r.parts)) for r in reported] == [
        ("nodule", True, 0),
        ("nodule", True, 0),
        ("mass", False, 0),
    ]
    assert [r.sources for r in reported[:2]] == [(s[0],), (s[1],)]
    assert reported[0].key != reported[1].key


def test_keys_are_stable_whatever_the_order_and_differ_between_lesions() -> None:
    study = generate_uid()
    s = _volume(5, study)
    cr = _radiograph(study, PixelSpacing=[0.1, 0.1])
    analyses = [
        _analysis(s[0], 0.9, _box(100, 100), _box(300, 300, peak=0.5)),
        _analysis(s[1], 0.9, _box(105, 100, peak=0.95)),
        _analysis(s[2], 0.2),
        _analysis(s[3], 0.6, _box(100, 100, peak=0.6)),
        _analysis(s[4], 0.1),
        _analysis(cr, 0.7, _box(10, 10), _box(500, 500, peak=0.3)),
        _analysis(cr, 0.1, algorithm=OTHER),
    ]
    reference = group_findings(analyses)
    keys = [r.key for r in reference]
    assert len(set(keys)) == len(keys) == 6
    assert keys[-1] == f"{study}|other|nodule|absent"
    rng = random.Random(7)
    for _ in range(5):
        shuffled = analyses[:]
        rng.shuffle(shuffled)
        again = group_findings(shuffled)
        assert [r.key for r in again] == keys
        assert [[p.source.SOPInstanceUID for p in r.parts] for r in again] == [
            [p.source.SOPInstanceUID for p in r.parts] for r in reference
        ]
    # Superior first: slice 1's second outline, then the lesion on slices 1-2, each named by
    # its series and the 10 mm cell its centre is in (patient mm), not by a slice.
    series = s[0].SeriesInstanceUID
    assert keys[0] == f"{study}|demo|nodule|{series}|5|5|0"
    assert [len(r.parts) for r in reference[:3]] == [1, 2, 1]
    assert keys[1] == f"{study}|demo|nodule|{series}|-14|-15|-1"
    # The radiograph's: its image and the outline's rank there.
    assert keys[3:5] == [f"{study}|demo|nodule|{cr.SOPInstanceUID}|{k}" for k in (0, 1)]


def test_at_most_max_lesions_are_listed_the_most_probable_and_the_rest_counted() -> None:
    """A model that marks many regions gets a report that lists the most probable
    MAX_LESIONS of them, in their anatomical order, and says how many more there were (a
    synthetic CT gave 714: a 20 s SR and a 4-minute Segmentation before)."""
    from nidaan.core.findings import MAX_LESIONS
    from nidaan.pacs_bridge.languages import load_language
    from nidaan.pacs_bridge.reports import _statements

    cr = _radiograph(generate_uid())
    total = MAX_LESIONS + 7
    # Separate boxes down the image, each its own lesion, with probabilities in a shuffled order.
    peaks = [0.5 + 0.4 * k / total for k in range(total)]
    random.Random(3).shuffle(peaks)
    boxes = [_box(10, 10 + 30 * k, 20, 20, peak=peaks[k]) for k in range(total)]
    reported = group_findings([_analysis(cr, 0.95, *boxes)])
    assert len(reported) == MAX_LESIONS
    listed = sorted(r.parts[0].outline.peak for r in reported)
    assert listed == sorted(peaks)[-MAX_LESIONS:], "not the most probable ones"
    tops = [r.parts[0].outline.box.y_min for r in reported]
    assert tops == sorted(tops), "no longer in anatomical order (top to bottom)"
    assert [r.unlisted for r in reported] == [7] + [0] * (MAX_LESIONS - 1)
    english = load_language("en")
    statements = _statements([(r, n) for n, r in enumerate(reported, 1)], [MODEL], english, None)
    texts = [str(item.TextValue) for item in statements.ContentSequence]
    assert any(t.startswith(f"7 further regions of {english.finding(CODE)}") for t in texts), texts
