"""End to end, as a radiology department sees it: a real Orthanc PACS sends a chest radiograph
to ``nidaan serve`` (the installed command, on its own process), and the DICOM SR with the AI
findings comes back into the same study in Orthanc."""

from __future__ import annotations

import io
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from conftest import MODELS
from factory import sample_file, save, synthetic_ct_series, synthetic_cxr, with_new_uids
from netutil import storescu
from peers import (
    Orthanc,
    free_port,
    nidaan_config,
    start_nidaan,
    start_orthanc,
    stop,
    wait_for_port,
    wait_until,
)
from srutil import codes, dciodvfy_errors, dsrdump_ok, evidence, graphics, numbers, texts, walk

NODULE, TB = "786838002", "112033"


@dataclass
class Deployment:
    orthanc: Orthanc
    nidaan: subprocess.Popen
    nidaan_port: int
    http_port: int
    log: Path
    sent: list[pydicom.Dataset] = field(default_factory=list)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("e2e")
    nidaan_port, http_port = free_port(), free_port()
    orthanc = start_orthanc(work / "orthanc", {"nidaan": ("NIDAAN", "127.0.0.1", nidaan_port)})
    config = nidaan_config(
        work / "nidaan.toml",
        port=nidaan_port,
        data_dir=work / "data",
        models=MODELS,
        extra=f'[http]\nbind = "127.0.0.1"\nport = {http_port}\n'
        '[reports]\ndestinations = ["@source", "ORTHANC"]\n'
        # Every result object, and the report's texts in Hindi beside English.
        f'[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        'objects = ["sr", "seg", "gsps", "sc"]\nlanguage = "hi"\n',
    )
    log = work / "nidaan.log"
    proc = start_nidaan(config, log, http=True)
    try:
        wait_for_port(nidaan_port, timeout=120, proc=proc)
        yield Deployment(orthanc, proc, nidaan_port, http_port, log)
    finally:
        stop(proc, signal.SIGTERM)
        stop(orthanc.process)


def _report_of(orthanc: Orthanc, study_id: str, timeout: float = 90) -> pydicom.Dataset:
    (sr,) = wait_until(lambda: orthanc.reports(study_id), timeout, "the SR in Orthanc")
    return pydicom.dcmread(__import__("io").BytesIO(orthanc.get(f"/instances/{sr['ID']}/file")))


def _objects_of(orthanc: Orthanc, study_id: str, count: int) -> dict[str, pydicom.Dataset]:
    """The study's instances in Orthanc once there are ``count``, one per modality."""
    instances = wait_until(
        lambda: (found := orthanc.study_instances(study_id)) and len(found) >= count and found,
        60,
        f"{count} instances in the study in Orthanc",
    )
    assert len(instances) == count
    out = {}
    for instance in instances:
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance['ID']}/file")))
        assert str(ds.Modality) not in out, f"two {ds.Modality} instances"
        out[str(ds.Modality)] = ds
    return out


def _regions(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The image items the SR's regions are selected from (one per image with a region)."""
    return [
        child
        for item in walk(sr)
        if "GraphicData" in item
        for child in item.get("ContentSequence", [])
        if "ReferencedSOPSequence" in child
    ]


def _report_of_study(orthanc: Orthanc, study_uid: str) -> pydicom.Dataset:
    """The SR of a study that was sent to Nidaan (not uploaded), once it is in Orthanc."""
    found = wait_until(
        lambda: orthanc.post("/tools/lookup", study_uid, content_type="text/plain"),
        90,
        "the study in Orthanc",
    )
    return _report_of(orthanc, found[0]["ID"])


def _check_report(sr: pydicom.Dataset, source: pydicom.Dataset, tmp_path: Path) -> None:
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == source.PatientID
    assert "NOT FOR DIAGNOSIS" in sr.SeriesDescription
    refs = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert refs == {source.SOPInstanceUID}
    assert {NODULE, TB} <= codes(sr)
    probabilities = [v for v in numbers(sr) if 0.0 <= v <= 1.0]
    assert len(probabilities) >= 2
    path = save(sr, tmp_path / "report.dcm")
    assert dciodvfy_errors(path) == []
    assert dsrdump_ok(path)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_orthanc_sends_a_real_radiograph_and_gets_the_report_back(
    deployment: Deployment, name: str, tmp_path: Path
) -> None:
    path = with_new_uids(sample_file(name), tmp_path / name)
    source = pydicom.dcmread(path)
    deployment.sent.append(source)
    answer = deployment.orthanc.upload(path)
    study_id = answer["ParentStudy"]
    assert deployment.orthanc.reports(study_id) == []
    deployment.orthanc.send_to("nidaan", study_id)
    sr = _report_of(deployment.orthanc, study_id)
    _check_report(sr, source, tmp_path)
    assert sr.SeriesDescription  # same study, visible in the PACS as its own series
    # The image and the SR; with a region, also its SEG, GSPS and Secondary Capture.
    drawn = 3 if graphics(sr) else 0
    objects = _objects_of(deployment.orthanc, study_id, 2 + drawn)
    assert sorted(objects) == sorted(["CR", "SR"] + (["PR", "SEG", "OT"] if drawn else []))


def test_storescu_sender_nodule_found_where_it_was_planted(
    deployment: Deployment, tmp_path: Path
) -> None:
    ds, masks = synthetic_cxr(3, nodule=True, rows=1200, columns=1000)
    path = save(ds, tmp_path / "nodule.dcm")
    deployment.sent.append(ds)
    run = storescu(deployment.nidaan_port, [path])
    assert run.returncode == 0, run.stderr
    sr = _report_of_study(deployment.orthanc, ds.StudyInstanceUID)
    _check_report(sr, ds, tmp_path)
    # The nodule's region is a closed polyline around the planted nodule, in source pixels.
    ys, xs = masks["nodule"].nonzero()
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    boxes = [g for g in graphics(sr) if len(g) >= 8]
    assert any(
        min(g[0::2]) <= cx <= max(g[0::2]) and min(g[1::2]) <= cy <= max(g[1::2]) for g in boxes
    ), f"no region contains the nodule centre ({cx:.0f}, {cy:.0f})"
    # The same region as objects every viewer shows, back in the study in Orthanc.
    study_id = deployment.orthanc.post(
        "/tools/lookup", ds.StudyInstanceUID, content_type="text/plain"
    )[0]["ID"]
    # storescu sent the image to Nidaan only: Orthanc has the four result objects.
    objects = _objects_of(deployment.orthanc, study_id, 4)
    assert sorted(objects) == ["OT", "PR", "SEG", "SR"]
    seg, gsps, sc = objects["SEG"], objects["PR"], objects["OT"]
    frames = seg.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    marked = frames.any(axis=0)
    assert marked[int(cy), int(cx)], "the SEG does not cover the nodule's centre"
    assert marked.sum() < 0.05 * marked.size  # the region, not the image
    refs = {
        r.ReferencedSOPInstanceUID
        for s in gsps.ReferencedSeriesSequence
        for r in s.ReferencedImageSequence
    }
    assert refs == {ds.SOPInstanceUID}
    # Its legends carry the peer's language too, intact through Orthanc.
    legends = [
        str(t.UnformattedTextValue)
        for a in gsps.GraphicAnnotationSequence
        for t in a.get("TextObjectSequence", [])
    ]
    assert gsps.SpecificCharacterSet == "ISO_IR 192"
    assert any(
        t.startswith("Pulmonary nodule 1") and "फेफड़े की गांठ (पल्मोनरी नोड्यूल) 1" in t for t in legends
    )
    assert sc.BurnedInAnnotation == "YES"
    # The SC burns in the peer's language too, below the English (Image Comments says it all).
    burned = str(sc.ImageComments).splitlines()
    assert "NOT FOR DIAGNOSIS" in burned and "निदान के लिए नहीं" in burned
    assert any(t.startswith("फेफड़े की गांठ (पल्मोनरी नोड्यूल) 1: संभावना") for t in burned)
    for modality, obj in objects.items():
        if modality != "OT" or obj is sc:
            assert obj.StudyInstanceUID == ds.StudyInstanceUID
        if modality in ("SEG", "PR", "OT"):
            path = save(obj, tmp_path / f"{modality}.dcm")
            assert dciodvfy_errors(path) == [], modality
    # The Hindi texts arrive intact through Orthanc (UTF-8, ISO_IR 192), beside the English.
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    said = texts(sr)
    assert "निदान के लिए नहीं" in said
    # Each summary starts with NOT FOR DIAGNOSIS (a synthetic-trained model), in its language.
    assert any(t.startswith("निदान के लिए नहीं: एआई द्वारा पाए गए निष्कर्ष: फेफड़े की गांठ") for t in said)
    assert any(
        t.startswith("NOT FOR DIAGNOSIS: AI findings present: Pulmonary nodule 1") for t in said
    )


def test_metrics_count_instances_and_logs_carry_no_phi(deployment: Deployment) -> None:
    def metrics() -> str:
        url = f"http://127.0.0.1:{deployment.http_port}/metrics"
        with urllib.request.urlopen(url) as r:
            return r.read().decode()

    # Orthanc has the last report a moment before Nidaan records its delivery.
    def delivered_three() -> str | None:
        text = metrics()
        return text if 'nidaan_studies_total{state="delivered"} 3.0' in text else None

    text = wait_until(delivered_three, 10, "three delivered studies in the metrics")
    assert 'nidaan_instances_received_total{status="0x0000"} 3.0' in text
    # The embedded batcher ran the radiographs and says so per model.
    assert 'nidaan_inference_batch_images_count{model="cxr_screen"}' in text
    assert 'nidaan_inference_images_total{model="cxr_screen"} 3.0' in text
    assert 'nidaan_inference_queued_images{model="cxr_screen"} 0.0' in text
    log = deployment.log.read_text()
    assert "listening as NIDAAN" in log
    assert "analysed" in log and "delivered" in log
    assert len(deployment.sent) == 3
    for ds in deployment.sent:
        identifiers = (
            ds.PatientName,
            ds.PatientID,
            ds.PatientBirthDate,
            ds.StudyInstanceUID,
            ds.SOPInstanceUID,
        )
        for phi in map(str, identifiers):
            assert phi
            assert phi not in log


def test_a_study_sent_twice_leaves_one_report_in_the_pacs(
    deployment: Deployment, tmp_path: Path
) -> None:
    path = with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "twice.dcm")
    deployment.sent.append(pydicom.dcmread(path, stop_before_pixels=True))
    study_id = deployment.orthanc.upload(path)["ParentStudy"]

    def deliveries() -> float:
        url = f"http://127.0.0.1:{deployment.http_port}/metrics"
        with urllib.request.urlopen(url) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('nidaan_report_deliveries_total{outcome="delivered"}'):
                    return float(line.split()[-1])
        return 0.0

    deployment.orthanc.send_to("nidaan", study_id)
    first = _report_of(deployment.orthanc, study_id)
    before = deliveries()
    deployment.orthanc.send_to("nidaan", study_id)  # the PACS sends the same study again
    wait_until(lambda: deliveries() > before, 60, "the report to be delivered again")
    (again,) = deployment.orthanc.reports(study_id)  # still exactly one SR in the study
    assert (
        pydicom.dcmread(
            io.BytesIO(deployment.orthanc.get(f"/instances/{again['ID']}/file"))
        ).SOPInstanceUID
        == first.SOPInstanceUID
    )


def test_a_study_with_radiograph_and_ct_comes_back_with_one_report_from_both_models(
    deployment: Deployment, tmp_path: Path
) -> None:
    cr, _ = synthetic_cxr(11, nodule=True, rows=800, columns=700)
    series, masks = synthetic_ct_series(
        1, (2,), slices=3, size=512, study_uid=cr.StudyInstanceUID, patient=cr
    )
    paths = [save(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate([cr, *series])]
    run = storescu(deployment.nidaan_port, paths)
    assert run.returncode == 0, run.stderr
    sr = _report_of_study(deployment.orthanc, cr.StudyInstanceUID)
    assert evidence(sr) == {str(ds.SOPInstanceUID) for ds in [cr, *series]}
    words = " ".join(texts(sr))
    assert "chest radiograph screen" in words and "chest CT slice nodule detector" in words
    ys, xs = masks[2].nonzero()
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    assert any(
        min(g[0::2]) <= cx <= max(g[0::2]) and min(g[1::2]) <= cy <= max(g[1::2])
        for g in graphics(sr)
        if len(g) >= 8
    ), "no region around the CT nodule"
    path = save(sr, tmp_path / "report.dcm")
    assert dciodvfy_errors(path) == []


def test_images_that_cannot_make_a_segmentation_still_get_their_report(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Slices that share one position (as some exports write them) cannot make a SEG
    (highdicom refuses duplicate planes): the SR, the GSPS and the SC still arrive, and the
    study's reason and the metrics say what was left out."""
    series, _ = synthetic_ct_series(5, (0, 1), slices=2, size=512)
    for ds in series:
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0]
    paths = [save(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(series)]
    run = storescu(deployment.nidaan_port, paths)
    assert run.returncode == 0, run.stderr
    study_uid = series[0].StudyInstanceUID
    sr = _report_of_study(deployment.orthanc, study_uid)
    assert graphics(sr), "the model found no nodule: the case tests nothing"
    study_id = deployment.orthanc.post("/tools/lookup", study_uid, content_type="text/plain")[0][
        "ID"
    ]
    # The SR, the GSPS and one Secondary Capture per slice with a region; no SEG.
    drawn = {str(r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for r in _regions(sr)}
    instances = wait_until(
        lambda: (
            (found := deployment.orthanc.study_instances(study_id))
            and len(found) >= 2 + len(drawn)
            and found
        ),
        60,
        "the result objects in Orthanc",
    )
    modalities = sorted(
        str(
            pydicom.dcmread(
                io.BytesIO(deployment.orthanc.get(f"/instances/{i['ID']}/file")),
                stop_before_pixels=True,
            ).Modality
        )
        for i in instances
    )
    assert modalities == sorted(["SR", "PR"] + ["OT"] * len(drawn))
    url = f"http://127.0.0.1:{deployment.http_port}/metrics"
    with urllib.request.urlopen(url) as r:
        assert 'nidaan_result_objects_failed_total{kind="seg"} 1.0' in r.read().decode()
    assert "no SEG: ValueError" in deployment.log.read_text()
