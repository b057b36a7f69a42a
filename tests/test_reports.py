"""The SR writer on a real chest radiograph header, checked by highdicom, dicom3tools and dcmtk."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from nidaan.core.findings import (
    AlgorithmInfo,
    BoundingBox,
    CodedValue,
    Finding,
    ImageAnalysis,
    Outline,
)
from nidaan.pacs_bridge.languages import available, load_language
from nidaan.pacs_bridge.reports import (
    NOT_FOR_DIAGNOSIS,
    algorithm_device_uid,
    build_report,
    report_uids,
    software_version,
)
from nidaan.pacs_bridge.uids import node_uid

from peers import need
from srutil import dciodvfy_errors, dsrdump_ok, graphics, texts, walk
from volumes import synthetic_ct_volume

SYNTHETIC = AlgorithmInfo(
    "Demo CXR screen",
    "0.1.0",
    "Nidaan project",
    trained_on_synthetic_data=True,
    model="cxr_demo",
    digest="ab" * 32,
    intended_use=(("en", "A demonstration only."), ("hi", "केवल एक प्रदर्शन।")),
)
VALIDATED = AlgorithmInfo("Validated model", "2.0", "Vendor", trained_on_synthetic_data=False)
NODULE = CodedValue("786838002", "SCT", "Pulmonary nodule")
TB = CodedValue("112033", "DCM", "Abnormal opacity")
BOX = BoundingBox(100.5, 200.0, 300.0, 420.25)
#: The closed 5-point POLYLINE the box must become, (column, row) pairs in source pixels.
BOX_POLYLINE = [100.5, 200.0, 300.0, 200.0, 300.0, 420.25, 100.5, 420.25, 100.5, 200.0]
PRESENT = ("52101004", "SCT")  # CID 241
ABSENT = ("272519000", "SCT")
DEVICE_UID = "2.25.1234567890"


@pytest.fixture
def source() -> pydicom.Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.fail("RG1_UNCR.dcm is not in pydicom's test data: pip install pydicom-data")
    return pydicom.dcmread(path, stop_before_pixels=True)


def _findings(region_on_absent: BoundingBox | None = None) -> tuple[Finding, Finding]:
    return (
        Finding("nodule", NODULE, 0.91, 0.5, BOX),
        Finding("tb", TB, 0.12, 0.5, region_on_absent),
    )


def _build(
    analyses: list[ImageAnalysis], key: str = "demo@0.1.0", language: str = ""
) -> tuple[hd.sr.Comprehensive3DSR, str, str]:
    series, sop = report_uids(str(analyses[0].source.StudyInstanceUID), key)
    sr = build_report(
        analyses,
        series_instance_uid=series,
        sop_instance_uid=sop,
        device_observer_uid=DEVICE_UID,
        institution_name="Test Hospital",
        language=language,
    )
    return sr, series, sop


def _report(
    source: pydicom.Dataset, algo: AlgorithmInfo = SYNTHETIC
) -> tuple[hd.sr.Comprehensive3DSR, str, str]:
    return _build([ImageAnalysis(algo, source, _findings())])


def _save(sr: pydicom.Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def _refuses(match: str, analyses: list[ImageAnalysis], **uids: str) -> None:
    kwargs = {
        "series_instance_uid": "2.25.11",
        "sop_instance_uid": "2.25.12",
        "device_observer_uid": DEVICE_UID,
        **uids,
    }
    with pytest.raises(ValueError, match=match):
        build_report(analyses, **kwargs)  # type: ignore[arg-type]


def _other_image(source: pydicom.Dataset) -> pydicom.Dataset:
    """A second image of the same study (a new series and instance)."""
    other = copy.deepcopy(source)
    other.SeriesInstanceUID = generate_uid()
    other.SOPInstanceUID = generate_uid()
    return other


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The measurement groups under "Imaging Measurements" (126010, DCM)."""
    (container,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return list(container.ContentSequence)


def _statements(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """TEXT items of the root "Qualitative Evaluations" container (C0034375, UMLS)."""
    (container,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    return list(container.ContentSequence)


def _language_of(item: pydicom.Dataset) -> str:
    """The RFC 5646 tag of an item's own Language of Content Item modifier ('' if none)."""
    for child in item.get("ContentSequence", []):
        if child.ConceptNameCodeSequence[0].CodeValue == "121049":
            return str(child.ConceptCodeSequence[0].CodeValue)
    return ""


def _group_items(group: pydicom.Dataset) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for item in walk(group):
        out.setdefault(str(item.ConceptNameCodeSequence[0].CodeMeaning), []).append(item)
    return out


def test_report_is_a_new_series_in_the_source_study(source: pydicom.Dataset) -> None:
    sr, series, sop = _report(source)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID and sr.PatientName == source.PatientName
    assert sr.AccessionNumber == source.AccessionNumber
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (series, sop)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9901, 1)
    assert sr.Modality == "SR" and sr.Manufacturer == "Nidaan project"
    assert sr.ManufacturerModelName == "Nidaan inference server"
    assert sr.SoftwareVersions == software_version() and sr.SoftwareVersions
    assert sr.DeviceSerialNumber.startswith("NDN-")
    assert "AI" in sr.SeriesDescription and NOT_FOR_DIAGNOSIS in sr.SeriesDescription
    assert sr.InstitutionName == "Test Hospital"
    # An AI result nobody has confirmed (PS3.3 C.17.2).
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == (
        "PRELIMINARY",
        "UNVERIFIED",
        "COMPLETE",
    )
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    (series_ref,) = study.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == source.SeriesInstanceUID
    (ref,) = series_ref.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID


def test_the_algorithm_is_contributing_equipment_with_a_device_uid_of_its_model(
    source: pydicom.Dataset,
) -> None:
    """AIR 6.5.3.1: one item per model, Purpose of Reference (Newcode1, 99IHE), and a Device UID
    that changes with the model file; not the source's scanner or institution."""
    sr, _, _ = _report(source)
    (item,) = sr.ContributingEquipmentSequence
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert item.Manufacturer == SYNTHETIC.manufacturer
    assert item.ManufacturerModelName == SYNTHETIC.name
    assert item.SoftwareVersions == SYNTHETIC.version
    assert item.DeviceUID == algorithm_device_uid(SYNTHETIC)
    assert SYNTHETIC.digest in item.ContributionDescription
    assert "InstitutionName" not in item
    retrained = AlgorithmInfo(**{**SYNTHETIC.__dict__, "digest": "cd" * 32})
    assert algorithm_device_uid(retrained) != algorithm_device_uid(SYNTHETIC)
    assert pydicom.uid.UID(item.DeviceUID).is_valid


def test_each_group_states_finding_probability_threshold_and_region(
    source: pydicom.Dataset,
) -> None:
    sr, _, _ = _report(source)
    groups = _groups(sr)
    assert len(groups) == 2  # the nodule (present, with its region) and tb's absence
    nodule, tb = (_group_items(g) for g in groups)
    for items, code, probability, evaluation in (
        (nodule, NODULE, 0.91, PRESENT),
        (tb, TB, 0.12, ABSENT),
    ):
        (finding,) = items["Finding"]
        assert finding.ConceptCodeSequence[0].CodeValue == code.value
        (certainty,) = items["Certainty of Finding"]
        assert float(certainty.MeasuredValueSequence[0].NumericValue) == pytest.approx(probability)
        assert certainty.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
        (threshold,) = items["Threshold Value"]
        assert float(threshold.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.5)
        (qual,) = items[code.meaning]
        answer = qual.ConceptCodeSequence[0]
        assert (answer.CodeValue, answer.CodingSchemeDesignator) == evaluation
        params = [i.TextValue for i in items["Algorithm Parameters"]]
        assert any("operating threshold 0.5" in p for p in params)
        assert any(NOT_FOR_DIAGNOSIS in p for p in params)
        assert [i.TextValue for i in items["Algorithm Name"]] == [SYNTHETIC.name]
    (region,) = nodule["Image Region"]
    assert list(map(float, region.GraphicData)) == BOX_POLYLINE
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    assert "Image Region" not in tb  # an absence has no region
    assert [i.TextValue for i in nodule["Tracking Identifier"]] == ["Pulmonary nodule 1"]


def test_the_report_says_not_for_diagnosis_and_the_intended_use_as_content(
    source: pydicom.Dataset,
) -> None:
    sr, _, _ = _report(source)
    said = [str(i.TextValue) for i in _statements(sr)]
    # The first text a reader sees (the summary) says it, not only a comment further down.
    assert said[0].startswith(
        "NOT FOR DIAGNOSIS: AI findings present: Pulmonary nodule 1: probability 0.91"
    )
    assert NOT_FOR_DIAGNOSIS in said
    assert "Intended use of Demo CXR screen: A demonstration only." in said
    assert any("at or above the model's operating threshold" in t for t in said)
    assert not any("प्रदर्शन" in t for t in said)  # English only unless a language is asked for


def test_absent_is_stated_once_per_study_and_model(source: pydicom.Dataset) -> None:
    other = _other_image(source)
    absent = (Finding("tb", TB, 0.2, 0.5), Finding("nodule", NODULE, 0.1, 0.5))
    sr, _, _ = _build(
        [ImageAnalysis(SYNTHETIC, source, absent), ImageAnalysis(SYNTHETIC, other, absent)]
    )
    groups = [_group_items(g) for g in _groups(sr)]
    assert len(groups) == 2  # one absence per finding, not one per image
    for items in groups:
        refs = {
            r.ReferencedSOPInstanceUID
            for i in items["Source of Measurement"]
            for r in i.ReferencedSOPSequence
        }
        assert refs == {source.SOPInstanceUID, other.SOPInstanceUID}
    said = [str(i.TextValue) for i in _statements(sr)]
    assert said[0] == (
        "NOT FOR DIAGNOSIS: No AI finding present at the models' operating thresholds."
    )


def test_two_regions_on_one_image_are_two_lesions(source: pydicom.Dataset) -> None:
    upper = Outline(((100.0, 100.0), (200.0, 100.0), (150.0, 180.0), (100.0, 100.0)), 0.9)
    lower = Outline.from_box(BoundingBox(300.0, 900.0, 380.0, 990.0), 0.7)
    finding = Finding("nodule", NODULE, 0.8, 0.5, outlines=(lower, upper))
    sr, _, _ = _build([ImageAnalysis(SYNTHETIC, source, (finding,))])
    groups = [_group_items(g) for g in _groups(sr)]
    assert [g["Tracking Identifier"][0].TextValue for g in groups] == [
        "Pulmonary nodule 1",
        "Pulmonary nodule 2",
    ]
    assert [len(g["Image Region"]) for g in groups] == [1, 1]
    # Anatomical order on a 2-D image: top first, whatever order the model gave them in.
    assert [list(map(float, g["Image Region"][0].GraphicData))[:2] for g in groups] == [
        [100.0, 100.0],
        [300.0, 900.0],
    ]


def test_tracking_uids_belong_to_the_finding_not_to_the_report(source: pydicom.Dataset) -> None:
    """The same finding of the same study has the same Tracking UID in another report of it
    (another route's, another revision's), and different findings have different ones."""
    analyses = [ImageAnalysis(SYNTHETIC, source, _findings())]
    first, _, _ = _build(analyses, key="dicom-route")
    second, _, _ = _build(analyses, key="grpc-route")
    assert first.SOPInstanceUID != second.SOPInstanceUID

    def tracking(sr: pydicom.Dataset) -> list[str]:
        return [str(g["Tracking Unique Identifier"][0].UID) for g in map(_group_items, _groups(sr))]

    assert tracking(first) == tracking(second)
    assert len(set(tracking(first))) == 2
    other_study = copy.deepcopy(source)
    other_study.StudyInstanceUID = generate_uid()
    third, _, _ = _build([ImageAnalysis(SYNTHETIC, other_study, _findings())])
    assert not set(tracking(third)) & set(tracking(first))


def test_image_library_lists_every_analysed_image(source: pydicom.Dataset) -> None:
    other = _other_image(source)
    sr, _, _ = _build(
        [
            ImageAnalysis(SYNTHETIC, source, _findings()),
            ImageAnalysis(SYNTHETIC, other, _findings()),
        ]
    )
    (library,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"
    ]
    refs = {
        r.ReferencedSOPInstanceUID
        for i in walk(library)
        for r in i.get("ReferencedSOPSequence", [])
    }
    assert refs == {source.SOPInstanceUID, other.SOPInstanceUID}


def test_a_second_language_is_added_beside_english_in_utf8(
    source: pydicom.Dataset, tmp_path: Path
) -> None:
    sr, _, _ = _build([ImageAnalysis(SYNTHETIC, source, _findings())], language="hi")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    statements = _statements(sr)
    english = [str(i.TextValue) for i in statements if _language_of(i) == ""]
    hindi = [str(i.TextValue) for i in statements if _language_of(i) == "hi"]
    assert english and hindi
    assert hindi[0].startswith(
        "निदान के लिए नहीं: एआई द्वारा पाए गए निष्कर्ष: फेफड़े की गांठ (पल्मोनरी नोड्यूल) 1"
    )
    assert "निदान के लिए नहीं" in hindi
    assert any("केवल एक प्रदर्शन।" in t for t in hindi)
    back = pydicom.dcmread(_save(sr, tmp_path / "hi.dcm"))
    assert [str(i.TextValue) for i in _statements(back)] == english + hindi
    assert not sr_has_question_marks(back)


def sr_has_question_marks(sr: pydicom.Dataset) -> bool:
    """Text that lost its characters on the way ("????") is the failure this guards against."""
    return any("??" in t for t in texts(sr))


def test_an_english_report_of_latin1_names_is_utf8_too(source: pydicom.Dataset) -> None:
    latin = copy.deepcopy(source)
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Müller^Jörg"
    sr, _, _ = _build([ImageAnalysis(SYNTHETIC, latin, _findings())])
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Müller^Jörg"
    plain, _, _ = _report(source)
    assert "SpecificCharacterSet" not in plain or plain.SpecificCharacterSet in ("", "ISO_IR 6")


def test_every_shipped_language_has_every_text(source: pydicom.Dataset) -> None:
    english = load_language("en")
    assert "hi" in available()
    for tag in available():
        language = load_language(tag)
        assert set(language.terms) == set(english.terms), tag
        assert set(language.findings) == set(english.findings), tag
        _build([ImageAnalysis(SYNTHETIC, source, _findings())], language=tag)
        if tag != "en":  # its Secondary Captures burn it in: the test command installs a font
            assert language.burn_font() is not None, f"{tag}: none of its burn_fonts installed"


@pytest.mark.parametrize("font", ["/etc/passwd", "../../../etc/passwd", ""])
def test_a_language_file_naming_a_font_outside_the_font_folders_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, font: str
) -> None:
    import shutil

    from nidaan.core.errors import ConfigError
    from nidaan.pacs_bridge import languages

    shutil.copy(languages._DIR / "en.toml", tmp_path / "en.toml")
    text = (languages._DIR / "hi.toml").read_text(encoding="utf-8")
    text = text.replace('tag = "hi"', 'tag = "xx"')
    text = text.replace('"truetype/lohit-devanagari/Lohit-Devanagari.ttf"', f'"{font}"')
    (tmp_path / "xx.toml").write_text(text, encoding="utf-8")
    monkeypatch.setattr(languages, "_DIR", tmp_path)
    with pytest.raises(ConfigError, match="xx.toml: burn_fonts must list font files relative"):
        languages.load_language.__wrapped__("xx")


@pytest.mark.parametrize("language", ["", "hi"])
def test_dciodvfy_finds_no_errors(source: pydicom.Dataset, tmp_path: Path, language: str) -> None:
    """dicom3tools' IOD checker: no line with "Error" (it exits 1 and prints them on errors)."""
    exe = need("dciodvfy")  # fails under CI=true, skips elsewhere, naming Debian dicom3tools
    sr, _, _ = _build([ImageAnalysis(SYNTHETIC, source, _findings())], language=language)
    path = _save(sr, tmp_path / "sr.dcm")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    assert errors == [], "\n".join(errors)
    assert run.returncode == 0, run.stderr


def test_dsrdump_reads_the_report(source: pydicom.Dataset, tmp_path: Path) -> None:
    assert dsrdump_ok(_save(_report(source)[0], tmp_path / "sr.dcm"))


def test_dsr2html_renders_the_hindi_text(source: pydicom.Dataset, tmp_path: Path) -> None:
    sr, _, _ = _build([ImageAnalysis(SYNTHETIC, source, _findings())], language="hi")
    path = _save(sr, tmp_path / "hi.dcm")
    run = subprocess.run([need("dsr2html"), "+U8", str(path)], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    html = run.stdout.decode("utf-8")
    assert "charset=UTF-8" in html or "charset=utf-8" in html
    assert "निदान के लिए नहीं" in html


def test_a_validated_model_report_carries_no_not_for_diagnosis_mark(
    source: pydicom.Dataset,
) -> None:
    sr, _, _ = _report(source, VALIDATED)
    assert str(_statements(sr)[0].TextValue).startswith("AI findings present: Pulmonary nodule 1")
    assert NOT_FOR_DIAGNOSIS not in sr.SeriesDescription
    assert not any(NOT_FOR_DIAGNOSIS in t for t in texts(sr))
    assert {VALIDATED.name, VALIDATED.version} <= set(texts(sr))


def test_one_report_covers_several_images_and_algorithms(source: pydicom.Dataset) -> None:
    other = _other_image(source)
    sr, _, _ = _build(
        [
            ImageAnalysis(SYNTHETIC, source, _findings()),
            ImageAnalysis(VALIDATED, other, (Finding("tb", TB, 0.7, 0.5),)),
        ]
    )
    assert NOT_FOR_DIAGNOSIS in sr.SeriesDescription  # any synthetic-trained model marks it
    refs = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert refs == {source.SOPInstanceUID, other.SOPInstanceUID}
    # SYNTHETIC: nodule present on one image, tb absent on it; VALIDATED: tb present.
    assert len(_groups(sr)) == 3
    assert len(sr.ContributingEquipmentSequence) == 2
    tracking = [i.UID for i in walk(sr) if i.ValueType == "UIDREF" and "UID" in i]
    assert len(set(tracking)) == len(tracking)


def test_study_attributes_come_from_whichever_image_has_them(source: pydicom.Dataset) -> None:
    """A CR with an accession number and an image without one: the report has the number;
    two different numbers: refused, naming the attribute (not the values)."""
    without = _other_image(source)
    without.AccessionNumber = ""
    sr, _, _ = _build(
        [
            ImageAnalysis(SYNTHETIC, without, _findings()),
            ImageAnalysis(SYNTHETIC, source, _findings()),
        ]
    )
    assert sr.AccessionNumber == source.AccessionNumber and source.AccessionNumber
    differing = _other_image(source)
    differing.AccessionNumber = "OTHER123"
    with pytest.raises(ValueError, match="disagree on AccessionNumber") as caught:
        _build(
            [
                ImageAnalysis(SYNTHETIC, source, _findings()),
                ImageAnalysis(SYNTHETIC, differing, _findings()),
            ]
        )
    assert "OTHER123" not in str(caught.value)


def test_a_region_past_the_far_edge_is_clipped_to_the_image(source: pydicom.Dataset) -> None:
    cols, rows = float(source.Columns), float(source.Rows)
    finding = Finding("nodule", NODULE, 0.9, 0.5, BoundingBox(cols - 10, rows - 20, cols + 3, rows))
    sr, _, _ = _build([ImageAnalysis(SYNTHETIC, source, (finding,))])
    (g,) = graphics(sr)
    assert max(g[0::2]) == cols and max(g[1::2]) == rows


def test_report_uids_are_deterministic_and_distinct(source: pydicom.Dataset) -> None:
    study = str(source.StudyInstanceUID)
    assert report_uids(study, "a") == report_uids(study, "a")
    assert report_uids(study, "a") != report_uids(study, "b")
    assert report_uids(study, "a") != report_uids("1.2.3", "a")
    series, sop = report_uids(study, "a")
    assert series != sop
    for uid in (series, sop):
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid
    # Rebuilding gives the same object identity, down to the tracking UIDs.
    first, second = _report(source)[0], _report(source)[0]
    assert first.SOPInstanceUID == second.SOPInstanceUID
    uidrefs = [[i.UID for i in walk(sr) if "UID" in i] for sr in (first, second)]
    assert uidrefs[0] == uidrefs[1]
    with pytest.raises(ValueError, match="non-empty key"):
        report_uids(study, "")


def test_the_node_uid_is_made_once_per_installation(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = node_uid(tmp_path / "a")
    assert first == node_uid(tmp_path / "a")  # kept across restarts
    (tmp_path / "b").mkdir()
    assert node_uid(tmp_path / "b") != first  # another installation, another device
    assert pydicom.uid.UID(first).is_valid and first.startswith("2.25.")
    (tmp_path / "a" / "node-uid").write_text("not a uid\n")
    with pytest.raises(ValueError, match="delete it"):
        node_uid(tmp_path / "a")


def test_inconsistent_input_is_refused(source: pydicom.Dataset) -> None:
    findings = _findings()
    ok = [ImageAnalysis(SYNTHETIC, source, findings)]
    _refuses("at least one analysed image", [])
    other_study = _other_image(source)
    other_study.StudyInstanceUID = generate_uid()
    _refuses("2 studies", [*ok, ImageAnalysis(SYNTHETIC, other_study, findings)])
    other_patient = _other_image(source)
    other_patient.PatientID = "someone else"
    _refuses("disagree on PatientID", [*ok, ImageAnalysis(SYNTHETIC, other_patient, findings)])
    _refuses("no findings", [ImageAnalysis(SYNTHETIC, source)])
    _refuses("not a valid UID", ok, series_instance_uid="1.2.03")
    _refuses("not a valid UID", ok, device_observer_uid="")
    _refuses("analysed image's series", ok, series_instance_uid=str(source.SeriesInstanceUID))
    _refuses("analysed image's SOP", ok, sop_instance_uid=str(source.SOPInstanceUID))
    _refuses("must differ", ok, series_instance_uid="2.25.5", sop_instance_uid="2.25.5")
    outside = Finding("nodule", NODULE, 0.9, 0.5, BoundingBox(5000, 10, 5100, 20))
    _refuses("outside the 1841x1955 image", [ImageAnalysis(SYNTHETIC, source, (outside,))])
    multiframe = copy.deepcopy(source)
    multiframe.NumberOfFrames = 2
    _refuses("multi-frame", [ImageAnalysis(SYNTHETIC, multiframe, findings)])
    # The value objects refuse nonsense before it reaches the writer.
    with pytest.raises(ValueError, match="empty"):
        BoundingBox(10, 10, 5, 20)
    with pytest.raises(ValueError, match="outside"):
        Finding("nodule", NODULE, 1.5, 0.5)
    with pytest.raises(ValueError, match="closed"):
        Outline(((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)))


def test_a_lesion_over_three_ct_slices_is_one_group_with_its_size_and_a_region_per_slice(
    tmp_path: Path,
) -> None:
    """TID 1411: one group for a nodule on three adjacent slices of a CT volume, its long axis
    in mm (Pixel Spacing, outlines sharpened to the input's pixels) and its outline on each
    slice; dicom3tools finds no error."""
    slices, _ = synthetic_ct_volume(1, [], slices=5, size=512)  # 500 mm / 512 px, 2.5 mm apart
    pixel = 500.0 / 512
    outlines = {
        1: ((200.5, 210.5), (220.5, 210.5), (220.5, 226.5), (200.5, 226.5), (200.5, 210.5)),
        2: ((196.5, 206.5), (224.5, 206.5), (224.5, 230.5), (196.5, 230.5), (196.5, 206.5)),
        3: ((202.5, 212.5), (218.5, 212.5), (218.5, 224.5), (202.5, 224.5), (202.5, 212.5)),
    }
    analyses = [
        ImageAnalysis(
            SYNTHETIC,
            ds,
            (
                Finding(
                    "nodule",
                    NODULE,
                    0.8 if k in outlines else 0.05,
                    0.5,
                    outlines=(Outline(outlines[k], 0.9, refined=True),) if k in outlines else (),
                ),
            ),
        )
        for k, ds in enumerate(slices)
    ]
    sr, _, _ = _build(analyses, key="ct-volume")
    path = _save(sr, tmp_path / "ct.dcm")
    assert dciodvfy_errors(path) == []
    (group,) = _groups(pydicom.dcmread(path))
    items = _group_items(group)
    assert [i.TextValue for i in items["Tracking Identifier"]] == ["Pulmonary nodule 1"]
    (size,) = items["Long axis"]
    value = size.MeasuredValueSequence[0]
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    # The widest part, slice 2: 28 x 24 pixels of 500/512 mm, corner to corner.
    assert float(value.NumericValue) == pytest.approx(round(pixel * np.hypot(28, 24), 1))
    regions = items["Image Region"]
    assert len(regions) == 3
    for region, k in zip(regions, (1, 2, 3), strict=True):
        (ref,) = region.ContentSequence[0].ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == slices[k].SOPInstanceUID
        assert list(map(float, region.GraphicData)) == [c for p in outlines[k] for c in p]
    summary = str(_statements(sr)[0].TextValue)
    assert (
        f"Pulmonary nodule 1: probability 0.80 (threshold 0.50), {pixel * np.hypot(28, 24):.0f} mm"
        in summary
    )


def test_building_a_report_leaves_the_source_header_as_it_was(source: pydicom.Dataset) -> None:
    """A CR that highdicom cannot describe by its modality (RG1 has no Imager Pixel Spacing) is
    described as "OT" in the Image Library; that must not change the image's own header, which
    the study's other reports (another language, a rebuild) read next."""
    assert "ImagerPixelSpacing" not in source and source.Modality == "CR"
    before = copy.deepcopy(source)
    analyses = [ImageAnalysis(SYNTHETIC, source, _findings())]
    for language in ("", "hi"):
        sr, _, _ = _build(analyses, language=language)
        procedures = [
            item.ConceptCodeSequence[0].CodeValue
            for item in walk(sr)
            if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
        ]
        assert procedures == ["43468-8"], language  # (LOINC) XR unspecified body region
    assert source == before
