"""The SR writer, on a real chest radiograph header, checked by dicom3tools and dcmtk."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from nidaan.pacs_bridge.reports import build_report, report_uids
from nidaan.server.findings import AlgorithmInfo, BoundingBox, CodedValue, Finding, ImageAnalysis

from factory import sample_file
from srutil import codes, dciodvfy_errors, dsrdump_ok, graphics, numbers, texts

ALGO = AlgorithmInfo("Demo CXR screen", "0.1.0", "Nidaan project", trained_on_synthetic_data=True)
NODULE = CodedValue("786838002", "SCT", "Pulmonary nodule")
TB = CodedValue("154283005", "SCT", "Pulmonary tuberculosis")


@pytest.fixture
def source() -> pydicom.Dataset:
    return pydicom.dcmread(sample_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def _report(source: pydicom.Dataset, algo: AlgorithmInfo = ALGO):  # type: ignore[no-untyped-def]
    present = Finding("nodule", NODULE, 0.91, 0.5, BoundingBox(100.5, 200.0, 300.0, 420.25))
    absent = Finding("tb", TB, 0.12, 0.5)
    series, sop = report_uids(source.StudyInstanceUID, "demo@0.1.0|" + source.SOPInstanceUID)
    return (
        build_report(
            [ImageAnalysis(algo, source, (present, absent))],
            series_instance_uid=series,
            sop_instance_uid=sop,
            device_observer_uid="2.25.1",
        ),
        series,
        sop,
    )


def test_report_is_in_the_source_study_and_says_what_was_found(
    source: pydicom.Dataset, tmp_path: Path
) -> None:
    sr, series, sop = _report(source)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (series, sop)
    assert sr.Modality == "SR" and sr.Manufacturer == "Nidaan"
    assert "NOT FOR DIAGNOSIS" in sr.SeriesDescription
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert {"786838002", "154283005", "52101004"} <= codes(sr)  # both findings, one Present
    assert 0.91 in numbers(sr) and 0.12 in numbers(sr)
    assert [100.5, 200.0, 300.0, 200.0, 300.0, 420.25, 100.5, 420.25, 100.5, 200.0] in graphics(sr)
    said = " ".join(texts(sr))
    assert "Demo CXR screen" in said and "0.1.0" in said and "NOT FOR DIAGNOSIS" in said
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert dsrdump_ok(path)


def test_a_real_model_report_carries_no_not_for_diagnosis_mark(source: pydicom.Dataset) -> None:
    real = AlgorithmInfo("Validated model", "2.0", "Vendor", trained_on_synthetic_data=False)
    sr, _, _ = _report(source, real)
    assert "NOT FOR DIAGNOSIS" not in sr.SeriesDescription
    assert not any("NOT FOR DIAGNOSIS" in t for t in texts(sr))


def test_report_uids_are_deterministic_and_distinct() -> None:
    assert report_uids("1.2.3", "a") == report_uids("1.2.3", "a")
    assert report_uids("1.2.3", "a") != report_uids("1.2.3", "b")
    assert report_uids("1.2.3", "a") != report_uids("1.2.4", "a")
    series, sop = report_uids("1.2.3", "a")
    assert series != sop and series.startswith("2.25.") and len(sop) <= 64


def test_inconsistent_input_is_refused(source: pydicom.Dataset) -> None:
    with pytest.raises(ValueError, match="at least one analysed image"):
        build_report(
            [],
            series_instance_uid="2.25.1",
            sop_instance_uid="2.25.2",
            device_observer_uid="2.25.3",
        )
    other = copy.deepcopy(source)
    other.StudyInstanceUID = generate_uid()
    other.SOPInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="2 studies"):
        build_report(
            [ImageAnalysis(ALGO, source), ImageAnalysis(ALGO, other)],
            series_instance_uid="2.25.1",
            sop_instance_uid="2.25.2",
            device_observer_uid="2.25.3",
        )
    with pytest.raises(ValueError, match="empty"):
        BoundingBox(10, 10, 5, 20)
    with pytest.raises(ValueError, match="outside"):
        Finding("nodule", NODULE, 1.5, 0.5)
