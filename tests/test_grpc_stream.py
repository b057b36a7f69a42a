"""AnalyzeStudy (instances streamed one per message), admission by bytes in flight
(grpc.max_inflight_mb), and GetStudy, on in-process servers called with the bundled client."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pydicom
import pytest
from prometheus_client import generate_latest
from test_grpc_api import _bytes

from nidaan.client import Client
from nidaan.core.config import Peer
from nidaan.core.errors import InputError, NidaanError, QueueFullError
from nidaan.server import api

from conftest import make_config
from factory import synthetic_ct_series, synthetic_cxr
from netutil import c_store
from peers import free_port, wait_until
from srutil import dciodvfy_errors, evidence, numbers, walk


def _mixed_study(seed: int) -> list[pydicom.Dataset]:
    """A radiograph and six CT slices (a nodule in slice 2) of one study."""
    cr, _ = synthetic_cxr(seed, nodule=True, rows=600, columns=500)
    series, _ = synthetic_ct_series(
        seed, (2,), slices=6, size=256, study_uid=cr.StudyInstanceUID, patient=cr
    )
    return [cr, *series]


def _summary(response) -> list[tuple]:  # type: ignore[no-untyped-def]
    return sorted(
        (r.sop_instance_uid, r.model, tuple((f.label, f.present) for f in r.findings))
        for r in response.results
    )


@pytest.fixture
def served(tmp_path: Path, start_server):  # type: ignore[no-untyped-def]
    server = start_server(make_config(tmp_path))
    with Client(f"127.0.0.1:{server.api.port}") as client:
        yield server, client


def test_a_streamed_study_gives_what_analyze_gives(served, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server, client = served
    # Analysed two instances at a time, so that the study is put together from several chunks.
    monkeypatch.setattr(api, "CHUNK_INSTANCES", 2)
    study = _mixed_study(70)
    files = []
    for i, ds in enumerate(study):  # paths: the client reads each file as it sends it
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(_bytes(ds))
        files.append(path)
    streamed = client.analyze_study(files, report=True)
    whole = client.analyze([_bytes(ds) for ds in study], report=True)
    assert streamed.study_instance_uid == study[0].StudyInstanceUID
    assert len(streamed.results) == 7
    assert _summary(streamed) == _summary(whole)
    ct = [r for r in streamed.results if r.model == "ct_nodule"]
    present = {r.sop_instance_uid for r in ct if any(f.present for f in r.findings)}
    assert study[3].SOPInstanceUID in present  # slice 2's nodule
    sr = pydicom.dcmread(io.BytesIO(streamed.report))
    assert evidence(sr) == {ds.SOPInstanceUID for ds in study}
    # The same report (its UIDs derive from the study, models and instances) with the same
    # findings, whichever way the study came; only its creation time differs.
    other = pydicom.dcmread(io.BytesIO(whole.report))
    assert sr.SOPInstanceUID == other.SOPInstanceUID
    assert sorted(numbers(sr)) == pytest.approx(sorted(numbers(other)), abs=1e-5)
    assert len(numbers(sr)) >= 7
    path = tmp_path / "sr.dcm"
    path.write_bytes(streamed.report)
    assert dciodvfy_errors(path) == []
    only_ct = client.analyze_study([_bytes(ds) for ds in study], models=["ct_nodule"])
    assert {r.model for r in only_ct.results} == {"ct_nodule"}
    assert list(only_ct.not_analysed) == [study[0].SOPInstanceUID]
    assert server.api.service.budget.in_flight == 0


def test_a_study_larger_than_the_budget_fits_only_when_streamed(tmp_path, start_server) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(tmp_path)
    cfg.grpc.max_inflight_mb = 2  # one 256 x 256 slice costs about 1 MiB; the study about 6
    server = start_server(cfg)
    study = [_bytes(ds) for ds in synthetic_ct_series(71, (1,), slices=6, size=256)[0]]
    with Client(f"127.0.0.1:{server.api.port}") as client:
        with pytest.raises(QueueFullError, match="RESOURCE_EXHAUSTED: .*grpc.max_inflight_mb.*Ana"):
            client.analyze(study)
        response = client.analyze_study(study)
        assert len(response.results) == 6
    budget = server.api.service.budget
    assert budget.in_flight == 0
    assert 0 < budget.peak <= budget.limit


def test_a_call_waits_for_room_then_is_refused_or_served(tmp_path, start_server) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(tmp_path)
    cfg.grpc.max_inflight_mb = 16
    cfg.grpc.admission_timeout_s = 0.5
    server = start_server(cfg)
    budget = server.api.service.budget
    image = _bytes(synthetic_cxr(72, rows=300, columns=300)[0])
    with Client(f"127.0.0.1:{server.api.port}") as client:
        # Another caller holds everything (as a burst of calls would): this one waits, then is
        # told so, both ways in.
        assert budget.try_acquire(budget.limit)
        with pytest.raises(QueueFullError, match="RESOURCE_EXHAUSTED: .*held its limit of 16 MiB"):
            client.analyze([image])
        with pytest.raises(QueueFullError, match="grpc.admission_timeout_s"):
            client.analyze_study([image])
        # Room comes while it waits: it is served.
        server.api.service.budget.timeout_s = 30.0
        results: list = []
        waiting = threading.Thread(target=lambda: results.append(client.analyze_study([image])))
        waiting.start()
        threading.Timer(0.5, budget.release, args=(budget.limit,)).start()
        waiting.join(30)
        assert len(results) == 1 and len(results[0].results) == 1
    assert budget.in_flight == 0
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'nidaan_grpc_admission_waits_total{outcome="refused"} 2.0' in metrics
    assert 'nidaan_grpc_admission_waits_total{outcome="admitted"} 1.0' in metrics
    assert "nidaan_grpc_inflight_limit_bytes 1.6777216e+07" in metrics


def test_bad_streams_are_named_and_give_their_bytes_back(served) -> None:  # type: ignore[no-untyped-def]
    server, client = served
    good, _ = synthetic_cxr(73, rows=300, columns=300)
    broken, _ = synthetic_cxr(74, rows=300, columns=300, study_uid=good.StudyInstanceUID)
    broken.PixelData = broken.PixelData[:1000]
    other, _ = synthetic_cxr(75, rows=300, columns=300)
    with pytest.raises(InputError, match="INVALID_ARGUMENT: instance 1: .*cannot be decoded"):
        client.analyze_study([_bytes(good), _bytes(broken)])
    with pytest.raises(InputError, match="INVALID_ARGUMENT: instance 2: not a readable DICOM"):
        client.analyze_study([_bytes(good), _bytes(good), b"not DICOM at all"])
    with pytest.raises(InputError, match="instance 1 is of another study.*belong to 2 studies"):
        client.analyze_study([_bytes(good), _bytes(other)])
    with pytest.raises(InputError, match="the stream carries no instance"):
        client.analyze_study([])
    with pytest.raises(NidaanError, match="NOT_FOUND: no model named 'mri_brain'"):
        client.analyze_study([_bytes(good)], models=["mri_brain"])
    quarantine = server.spool.quarantine_dir
    assert len(list(quarantine.glob("*.dcm"))) == 2  # the broken image and the garbage
    assert server.api.service.budget.in_flight == 0
    assert len(client.analyze_study([_bytes(good)]).results) == 1  # and it goes on serving


def test_get_study_tells_state_findings_and_report_of_a_dicom_study(tmp_path, start_server) -> None:  # type: ignore[no-untyped-def]
    # The destination is down (nothing listens there): the report waits in the outbox, which is
    # what GetStudy reads it from.
    cfg = make_config(
        tmp_path, peers=[Peer("PACS", "127.0.0.1", free_port())], destinations=["PACS"]
    )
    server = start_server(cfg)
    ds, masks = synthetic_cxr(76, nodule=True, rows=800, columns=700)
    with Client(f"127.0.0.1:{server.api.port}") as client:
        with pytest.raises(NidaanError, match="NOT_FOUND: no study"):
            client.get_study(ds.StudyInstanceUID)
        with pytest.raises(InputError, match="INVALID_ARGUMENT: study_instance_uid is not a val"):
            client.get_study("not a UID")
        c_store(server.scp.port, [ds])
        study = wait_until(
            lambda: (s := client.get_study(ds.StudyInstanceUID, report=True)).results and s,
            60,
            "the study's report",
        )
        assert study.state in ("reported", "delivered") and study.instances == 1
        direct = client.analyze([_bytes(ds)])
        (result,) = study.results
        (expected,) = direct.results
        assert (result.sop_instance_uid, result.model) == (ds.SOPInstanceUID, "cxr_screen")
        assert result.not_for_diagnosis and result.model_version == expected.model_version
        assert [(f.label, f.code.value, f.present, f.threshold) for f in result.findings] == [
            (f.label, f.code.value, f.present, f.threshold) for f in expected.findings
        ]
        for got, want in zip(result.findings, expected.findings, strict=True):
            assert got.probability == pytest.approx(want.probability, abs=1e-5)
        nodule = next(f for f in result.findings if f.label == "nodule")
        ys, xs = masks["nodule"].nonzero()
        assert nodule.region.x_min <= xs.mean() + 0.5 <= nodule.region.x_max
        assert nodule.region.y_min <= ys.mean() + 0.5 <= nodule.region.y_max
        sr = pydicom.dcmread(io.BytesIO(study.report))
        assert sr.SOPInstanceUID == study.report_sop_instance_uid
        assert evidence(sr) == {ds.SOPInstanceUID}
        without = client.get_study(ds.StudyInstanceUID)
        assert without.report == b"" and len(without.results) == 1
        # The same findings have the same Tracking UIDs in the gRPC route's report of the study,
        # though the two reports are different objects.
        grpc_sr = pydicom.dcmread(io.BytesIO(client.analyze([_bytes(ds)], report=True).report))
        assert grpc_sr.SOPInstanceUID != sr.SOPInstanceUID
        assert _tracking_uids(grpc_sr) == _tracking_uids(sr) and _tracking_uids(sr)


def _tracking_uids(sr: pydicom.Dataset) -> list[str]:
    """Tracking Unique Identifiers (112040, DCM) of an SR's groups, in order."""
    return [
        str(item.UID) for item in walk(sr) if item.ConceptNameCodeSequence[0].CodeValue == "112040"
    ]


def test_get_study_finds_the_report_of_a_study_with_no_destination(tmp_path, start_server) -> None:  # type: ignore[no-untyped-def]
    """A sender that is not a configured peer: the report stays in the data dir, the study's
    reason says so and how to deliver it, and GetStudy still shows its findings and report."""
    server = start_server(make_config(tmp_path, peers=[Peer("PACS", "127.0.0.1", free_port())]))
    ds, _ = synthetic_cxr(77, nodule=True, rows=800, columns=700)
    with Client(f"127.0.0.1:{server.api.port}") as client:
        c_store(server.scp.port, [ds])
        study = wait_until(
            lambda: (s := client.get_study(ds.StudyInstanceUID, report=True)).report and s,
            60,
            "the study's report",
        )
        assert study.state == "reported" and len(study.results) == 1
        reason = server.state.study(str(ds.StudyInstanceUID))[1]
        assert "AE 'MODALITY', is not a configured peer" in reason
        assert "add a [[peers]] entry with ae_title = 'MODALITY'" in reason
        assert pydicom.dcmread(io.BytesIO(study.report)).SOPInstanceUID == (
            study.report_sop_instance_uid
        )
