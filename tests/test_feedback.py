"""Radiologist feedback (issue 14 item 5): a verdict on a finding recorded over gRPC
(RecordFeedback) and by C-STORE of a verified SR that references Nidaan's report (sent by dcmtk's
storescu), stored in the state database, counted in the metrics and listed in the export
manifest. An unverified SR, or one referencing a report Nidaan did not make, is stored as an
ordinary object and not counted, and the log says so without patient data."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nidaan.client import Client, InputError, NidaanError
from nidaan.server.cli import main

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store, storescu
from peers import wait_until
from srutil import dsrdump_ok, walk

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
READER = "Rao^Anita^^Dr"
COMMENT = "PLNT-COMMENT-7731 seen on the prior film"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _item(value_type: str, name: tuple[str, str, str], **value: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(*name)]
    for k, v in value.items():
        setattr(item, k, v)
    return item


def review_sr(
    image: Dataset,
    report: Dataset,
    verdicts: list[tuple[str, str, bool]],
    *,
    verified: bool = True,
    references: str | None = None,
) -> Dataset:
    """A PACS-side review as docs/governance.md's convention has it: a Comprehensive SR in the
    image's study, Predecessor Documents = Nidaan's report, one Measurement Group per finding
    reviewed with its Tracking UID (or finding code), Agreement with AI finding and a Comment."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    ds.SOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        setattr(ds, kw, image.get(kw, ""))
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        setattr(ds, kw, image.get(kw, ""))
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Manufacturer = "Test PACS review"
    ds.ContentDate, ds.ContentTime = "20260102", "101500"
    ds.InstanceCreationDate, ds.InstanceCreationTime = "20260102", "101500"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED" if verified else "UNVERIFIED"
    if verified:
        observer = Dataset()
        observer.VerifyingObserverName = READER
        observer.VerifyingOrganization = "Test hospital"
        observer.VerificationDateTime = "20260102101500"
        observer.VerifyingObserverIdentificationCodeSequence = []
        ds.VerifyingObserverSequence = [observer]
    ref = Dataset()
    ref.ReferencedSOPClassUID = report.SOPClassUID
    ref.ReferencedSOPInstanceUID = references or report.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = report.SeriesInstanceUID
    series.ReferencedSOPSequence = [ref]
    study = Dataset()
    study.StudyInstanceUID = report.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    ds.PredecessorDocumentsSequence = [study]
    ds.PerformedProcedureCodeSequence = []
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("126000", "DCM", "Imaging Measurement Report")]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "1500"
    ds.ContentTemplateSequence = [template]
    groups = []
    for tracking_uid, finding_code, agree in verdicts:
        children = []
        if tracking_uid:
            children.append(
                _item("UIDREF", ("112040", "DCM", "Tracking Unique Identifier"), UID=tracking_uid)
            )
        if finding_code:
            children.append(
                _item(
                    "CODE",
                    ("121071", "DCM", "Finding"),
                    ConceptCodeSequence=[_code(finding_code, "SCT", "Pulmonary nodule")],
                )
            )
        value = (
            ("122775", "DCM", "Agreement with prior findings")
            if agree
            else ("122776", "DCM", "Disagreement with prior findings")
        )
        children.append(
            _item(
                "CODE",
                ("AIAGREE", "99NIDAAN", "Agreement with AI finding"),
                ConceptCodeSequence=[_code(*value)],
            )
        )
        children.append(_item("TEXT", ("121106", "DCM", "Comment"), TextValue=COMMENT))
        group = _item("CONTAINER", ("125007", "DCM", "Measurement Group"))
        group.ContinuityOfContent = "SEPARATE"
        group.ContentSequence = children
        groups.append(group)
    measurements = _item("CONTAINER", ("126010", "DCM", "Imaging Measurements"))
    measurements.ContinuityOfContent = "SEPARATE"
    measurements.ContentSequence = groups
    ds.ContentSequence = [measurements]
    return ds


def _tracking(report: Dataset) -> dict[str, str]:
    """Tracking UID of each measurement group of Nidaan's report, by its finding's code."""
    out = {}
    for group in walk(report):
        names = {
            str(i.ConceptNameCodeSequence[0].CodeValue): i
            for i in group.get("ContentSequence", [])
            if i.get("ConceptNameCodeSequence")
        }
        if "112040" in names and "121071" in names:
            out[str(names["121071"].ConceptCodeSequence[0].CodeValue)] = str(names["112040"].UID)
    return out


def _metric(server, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A running Nidaan (DICOM and gRPC) that has reported two radiographs with a nodule."""
    from nidaan.server.app import NidaanServer

    tmp = tmp_path_factory.mktemp("feedback")
    cfg = make_config(tmp, idle_timeout_s=0.5)
    server = NidaanServer(cfg)
    server.start(http=False)
    images = [synthetic_cxr(s, nodule=True, rows=320, columns=288)[0] for s in (91, 92)]
    for ds in images:
        ds.BurnedInAnnotation = "NO"
        assert c_store(server.scp.port, [ds])[0].Status == 0
    uids = [str(ds.StudyInstanceUID) for ds in images]
    wait_until(lambda: all(server.state.study(u)[0] == "reported" for u in uids), 60, "reported")
    reports = [dcmread(server.state.latest_report(u)[0]) for u in uids]  # type: ignore[index]
    try:
        yield {"server": server, "images": images, "reports": reports, "cfg": cfg, "tmp": tmp}
    finally:
        server.stop()


def test_grpc_feedback_is_stored_counted_and_exported(node: dict) -> None:
    server, image, report = node["server"], node["images"][0], node["reports"][0]
    study = str(image.StudyInstanceUID)
    tracking = _tracking(report)
    assert set(tracking) == {"786838002", "112033"}  # nodule present, opacity absent
    with Client(f"127.0.0.1:{server.api.port}") as client:
        # The nodule, by its Tracking UID in the report (as GetStudy returns it).
        got = client.get_study(study, report=True)
        assert dcmread(__import__("io").BytesIO(got.report)).SOPInstanceUID == report.SOPInstanceUID
        response = client.record_feedback(
            study,
            tracking_uid=tracking["786838002"],
            agree=False,
            comment=COMMENT,
            reader_id=READER,
        )
        assert response.report_sop_instance_uid == report.SOPInstanceUID
        (rec,) = response.recorded
        assert (rec.model, rec.finding, rec.tracking_uid) == (
            "cxr_screen",
            "nodule",
            tracking["786838002"],
        )
        # The opacity's absence, by model and finding label.
        (rec,) = client.record_feedback(
            study, model="cxr_screen", finding="tb", agree=True
        ).recorded
        assert (rec.finding, rec.tracking_uid) == ("tb", "")
        # What Nidaan has no report of is NOT_FOUND; a request naming no finding is refused.
        with pytest.raises(NidaanError, match="NOT_FOUND: Nidaan has no report"):
            client.record_feedback(generate_uid(), model="cxr_screen", finding="tb", agree=True)
        with pytest.raises(NidaanError, match="NOT_FOUND: .*no finding with this tracking_uid"):
            client.record_feedback(study, tracking_uid=generate_uid(), agree=True)
        with pytest.raises(NidaanError, match="NOT_FOUND: .*no finding 'nodule' of model 'ct_"):
            client.record_feedback(study, model="ct_nodule", finding="nodule", agree=True)
        with pytest.raises(InputError, match="name the finding"):
            client.record_feedback(study, agree=True)
    rows = server.state.feedback(study)
    assert [(r.model, r.finding, r.verdict, r.source) for r in rows] == [
        ("cxr_screen", "nodule", "disagree", "grpc"),
        ("cxr_screen", "tb", "agree", "grpc"),
    ]
    assert rows[0].comment == COMMENT
    assert len(rows[0].reader) == 32 and "Rao" not in rows[0].reader
    assert rows[1].reader == ""
    m = {"model": "cxr_screen"}
    assert _metric(server, "nidaan_feedback_total", **m, finding="nodule", verdict="disagree") == 1
    assert _metric(server, "nidaan_feedback_total", **m, finding="tb", verdict="agree") == 1
    text = generate_latest(server.metrics.registry).decode()
    assert study not in text and "Rao" not in text
    audit = (Path(node["cfg"].storage.data_dir) / "audit.jsonl").read_text()
    assert '"event": "feedback"' in audit and "Rao" not in audit and "PLNT-COMMENT" not in audit


def test_a_verified_sr_sent_by_storescu_is_recorded(node: dict, tmp_path: Path) -> None:
    server, image, report = node["server"], node["images"][1], node["reports"][1]
    study = str(image.StudyInstanceUID)
    tracking = _tracking(report)
    analysed = _metric(
        server,
        "nidaan_findings_analysed_total",
        model="cxr_screen",
        finding="nodule",
        modality="CR",
    )
    sr = review_sr(image, report, [(tracking["786838002"], "", True), ("", "112033", False)])
    path = tmp_path / "review.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dsrdump_ok(path)  # dcmtk reads it as a structured report
    sent = storescu(server.scp.port, [path], calling="PACS")
    assert sent.returncode == 0, sent.stderr
    rows = wait_until(lambda: server.state.feedback(study), 30, "the SR's verdicts")
    wait_until(lambda: len(server.state.feedback(study)) == 2, 10, "both verdicts")
    rows = server.state.feedback(study)
    assert sorted((r.finding, r.verdict, r.source, r.tracking_uid) for r in rows) == [
        ("nodule", "agree", "sr", tracking["786838002"]),
        ("tb", "disagree", "sr", tracking["112033"]),
    ]
    assert {r.source_uid for r in rows} == {str(sr.SOPInstanceUID)}
    assert rows[0].reader and READER not in rows[0].reader
    m = {"model": "cxr_screen"}
    assert _metric(server, "nidaan_feedback_total", **m, finding="nodule", verdict="agree") == 1
    # The SR is kept as the study's object; the study goes back to reported, not analysed again.
    stored = {r.sop_instance_uid: r for r in server.state.instances(study)}
    assert not stored[str(sr.SOPInstanceUID)].is_image
    wait_until(lambda: server.state.study(study)[0] == "reported", 10, "reported again")
    assert server.state.latest_report(study)[1] == report.SOPInstanceUID  # type: ignore[index]
    counted = _metric(
        server,
        "nidaan_findings_analysed_total",
        model="cxr_screen",
        finding="nodule",
        modality="CR",
    )
    assert counted == analysed
    # Sent again (the same SOP Instance UID): nothing new.
    assert storescu(server.scp.port, [path], calling="PACS").returncode == 0
    assert len(server.state.feedback(study)) == 2


def test_unverified_or_unknown_report_srs_are_stored_not_counted(
    node: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, image, report = node["server"], node["images"][1], node["reports"][1]
    study = str(image.StudyInstanceUID)
    nodule = _tracking(report)["786838002"]
    before = len(server.state.feedback())
    unverified = review_sr(image, report, [(nodule, "", False)], verified=False)
    unknown = review_sr(image, report, [(nodule, "", False)], references=generate_uid())
    paths = []
    for n, ds in enumerate((unverified, unknown)):
        paths.append(tmp_path / f"sr{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    with caplog.at_level(logging.INFO, logger="nidaan.feedback"):
        assert storescu(server.scp.port, paths, calling="PACS").returncode == 0
        wait_until(
            lambda: sum("is not feedback" in r.getMessage() for r in caplog.records) >= 2,
            30,
            "both SRs looked at",
        )
    messages = [r.getMessage() for r in caplog.records if "is not feedback" in r.getMessage()]
    assert any("not verified" in m for m in messages), messages
    assert any("references no report Nidaan made" in m for m in messages), messages
    for m in messages:  # named by digest: no UID, no patient, no reader, no comment
        for value in (
            study,
            str(unverified.SOPInstanceUID),
            str(unknown.SOPInstanceUID),
            str(image.PatientID),
            str(image.PatientName),
            READER,
            COMMENT,
        ):
            assert value not in m, m
    assert len(server.state.feedback()) == before
    stored = {r.sop_instance_uid for r in server.state.instances(study)}
    assert {str(unverified.SOPInstanceUID), str(unknown.SOPInstanceUID)} <= stored
    assert (
        _metric(
            server,
            "nidaan_feedback_total",
            model="cxr_screen",
            finding="nodule",
            verdict="disagree",
        )
        == 1
    )  # the gRPC verdict only (test order: gRPC first)


def test_the_export_manifest_lists_the_verdicts(node: dict) -> None:
    tmp, cfg = node["tmp"], node["cfg"]
    config = tmp / "nidaan.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{cfg.storage.data_dir}"\n'
        f'[models]\nrepository = "{cfg.models.repository}"\n'
    )
    out = tmp / "export"
    assert main(["--config", str(config), "export", "--deidentify", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())["images"]
    assert len(manifest) == 2
    verdicts = sorted(
        (
            f["feedback"]["agree"],
            f["feedback"]["disagree"],
            label,
        )
        for row in manifest
        for label, f in row["models"]["cxr_screen"]["findings"].items()
    )
    # Image 1: nodule disagree, tb agree (gRPC); image 2: nodule agree, tb disagree (SR).
    assert verdicts == [(0, 1, "nodule"), (0, 1, "tb"), (1, 0, "nodule"), (1, 0, "tb")]
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["finding"], r["feedback_agree"], r["feedback_disagree"]) for r in rows} == {
        ("nodule", "0", "1"),
        ("tb", "1", "0"),
        ("nodule", "1", "0"),
        ("tb", "0", "1"),
    }
    # Neither the comment nor the reader leaves the node: the review SRs Nidaan received are left
    # out and listed (the profile keeps an SR's free text), their verdicts are in the manifest.
    excluded = json.loads((out / "manifest.json").read_text())["excluded"]
    reasons = [e["reason"] for e in excluded]
    assert sum(r.startswith("a structured report Nidaan received") for r in reasons) == 3
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"Rao" not in data and b"PLNT-COMMENT" not in data
