"""The gRPC API (nidaan.v1.Inference) of a running server, called as an integrator would: with the
bundled client and with plain grpcio (health, reflection)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from nidaan.client import Client
from nidaan.core.errors import InferenceError, InputError, NidaanError, QueueFullError
from nidaan.server.api import status_code

from conftest import MODELS, make_config
from factory import sample_file, synthetic_ct_series, synthetic_cxr
from netutil import c_store
from peers import wait_until
from srutil import dciodvfy_errors, evidence

ROOT = Path(__file__).resolve().parents[1]


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path: Path, start_server):  # type: ignore[no-untyped-def]
    server = start_server(make_config(tmp_path))
    assert server.api is not None
    with Client(f"127.0.0.1:{server.api.port}") as client:
        yield server, client


def test_a_radiograph_is_analysed_and_its_report_returned(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, client = served
    ds, masks = synthetic_cxr(3, nodule=True, rows=1100, columns=950)
    response = client.analyze([_bytes(ds)], report=True)
    assert response.study_instance_uid == ds.StudyInstanceUID
    (result,) = response.results
    assert result.model == "cxr_screen" and result.not_for_diagnosis
    assert result.sop_instance_uid == ds.SOPInstanceUID
    expected = server.pipeline.analyse([ds])[0]
    assert [f.label for f in result.findings] == [f.label for f in expected.findings]
    assert [f.present for f in result.findings] == [f.present for f in expected.findings]
    nodule = next(f for f in result.findings if f.label == "nodule")
    assert nodule.present and nodule.code.value == "786838002"
    ys, xs = masks["nodule"].nonzero()
    assert nodule.region.x_min <= xs.mean() + 0.5 <= nodule.region.x_max
    assert nodule.region.y_min <= ys.mean() + 0.5 <= nodule.region.y_max
    sr = pydicom.dcmread(io.BytesIO(response.report))
    assert (
        sr.StudyInstanceUID == ds.StudyInstanceUID and "NOT FOR DIAGNOSIS" in sr.SeriesDescription
    )
    assert evidence(sr) == {ds.SOPInstanceUID}
    path = tmp_path / "sr.dcm"
    path.write_bytes(response.report)
    assert dciodvfy_errors(path) == []


def test_a_mixed_study_runs_both_models_or_only_those_named(served) -> None:  # type: ignore[no-untyped-def]
    _, client = served
    cr, _ = synthetic_cxr(12, rows=500, columns=450)
    series, _ = synthetic_ct_series(12, (1,), slices=2, size=256, study_uid=cr.StudyInstanceUID)
    mr = pydicom.dcmread(sample_file("MR_small.dcm"))
    mr.StudyInstanceUID = cr.StudyInstanceUID
    instances = [_bytes(d) for d in (cr, *series, mr)]
    everything = client.analyze(instances)
    assert sorted(r.model for r in everything.results) == ["ct_nodule", "ct_nodule", "cxr_screen"]
    assert list(everything.not_analysed) == [mr.SOPInstanceUID]
    ct_only = client.analyze(instances, models=["ct_nodule"])
    assert [r.model for r in ct_only.results] == ["ct_nodule", "ct_nodule"]
    with pytest.raises(NidaanError, match="NOT_FOUND: no model named 'mri_brain'"):
        client.analyze(instances, models=["mri_brain"])


def test_bad_input_gets_invalid_argument_and_is_quarantined(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, client = served
    with pytest.raises(InputError, match="INVALID_ARGUMENT: instance 0: not a readable DICOM"):
        client.analyze([b"this is not DICOM at all"])
    broken, _ = synthetic_cxr(13, rows=300, columns=300)
    broken.PixelData = broken.PixelData[:1000]
    good, _ = synthetic_cxr(14, rows=300, columns=300, study_uid=broken.StudyInstanceUID)
    with pytest.raises(InputError, match="instance 1: .*cannot be decoded"):
        client.analyze([_bytes(good), _bytes(broken)])
    assert server.api.service.budget.in_flight == 0  # nothing of the call is left held
    other, _ = synthetic_cxr(15, rows=300, columns=300)
    with pytest.raises(InputError, match="belong to 2 studies"):
        client.analyze([_bytes(good), _bytes(other)])
    quarantine = server.config.storage.data_dir / "quarantine"
    reasons = sorted(json.loads(p.read_text())["reason"] for p in quarantine.glob("*.json"))
    assert len(reasons) == 2 and all(r.startswith("instance ") for r in reasons)
    assert {json.loads(p.read_text())["status"] for p in quarantine.glob("*.json")} == {
        "gRPC INVALID_ARGUMENT"
    }
    assert len(client.analyze([_bytes(good)]).results) == 1  # and it goes on serving


def test_health_reflection_models_metrics_and_audit(served) -> None:  # type: ignore[no-untyped-def]
    server, client = served
    channel = client.channel
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "nidaan.v1.Inference"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"nidaan.v1.Inference", "grpc.health.v1.Health"} <= names
    models = client.list_models().models
    assert [m.name for m in models] == ["ct_nodule", "cxr_screen"]
    assert all(m.not_for_diagnosis and "NOT FOR DIAGNOSIS" in m.model_card for m in models)
    assert list(models[0].modalities) == ["CT"]
    ds, _ = synthetic_cxr(16, rows=300, columns=300)
    client.analyze([_bytes(ds)])
    text = generate_latest(server.metrics.registry).decode()
    assert 'nidaan_grpc_requests_total{code="OK",method="Analyze"} 1.0' in text
    assert 'nidaan_grpc_requests_total{code="OK",method="ListModels"} 1.0' in text
    audit = (server.config.storage.data_dir / "audit.jsonl").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    assert any(
        e["event"] == "grpc"
        and e["method"] == "Analyze"
        and e["code"] == "OK"
        and e["study"] == ds.StudyInstanceUID
        for e in events
    )
    assert str(ds.PatientName) not in audit and str(ds.PatientID) not in audit


def _repository_with_delay(tmp_path: Path, delay_us: int, preferred: str | None = None) -> Path:
    """A copy of the repository whose radiograph model waits ``delay_us`` for company."""
    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("training"))
    config = models / "cxr_screen" / "config.pbtxt"
    text = re.sub(
        r"max_queue_delay_microseconds: \d+",
        f"max_queue_delay_microseconds: {delay_us}",
        config.read_text(),
    )
    if preferred is not None:
        text = re.sub(
            r"preferred_batch_size: \[[^]]*\]", f"preferred_batch_size: {preferred}", text
        )
    config.write_text(text)
    return models


def test_a_full_queue_answers_resource_exhausted_and_loses_nothing(
    tmp_path: Path, start_server
) -> None:  # type: ignore[no-untyped-def]
    # One image fills the queue, and it waits 3 s for company that a batch of 16 would need.
    cfg = make_config(tmp_path)
    cfg.models.repository = _repository_with_delay(tmp_path, 3_000_000, "[ 16 ]")
    cfg.inference.max_queue_images = 1
    cfg.inference.queue_timeout_s = 0.0
    server = start_server(cfg)
    first, _ = synthetic_cxr(50, rows=300, columns=300)
    second, _ = synthetic_cxr(51, rows=300, columns=300)
    client = Client(f"127.0.0.1:{server.api.port}")
    results: list = []
    waiting = threading.Thread(target=lambda: results.append(client.analyze([_bytes(first)])))
    waiting.start()
    wait_until(
        lambda: server.backend.stats()["cxr_screen"].queued_images == 1, 30, "a queued image"
    )
    with pytest.raises(QueueFullError, match="RESOURCE_EXHAUSTED: .*queue is full"):
        client.analyze([_bytes(second)])
    waiting.join(30)
    client.close()
    assert len(results) == 1 and results[0].results[0].sop_instance_uid == first.SOPInstanceUID
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'nidaan_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="Analyze"} 1.0' in metrics
    assert 'nidaan_inference_rejected_total{model="cxr_screen"} 1.0' in metrics


def test_dicom_and_grpc_requests_share_the_models_batches(
    tmp_path: Path, start_server, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Every batch ONNX Runtime runs is recorded, and each image in it traced back, by its tensor,
    # to the route that sent it: a batch must hold images from both routes. (Counting batches
    # alone proves nothing: the six gRPC calls batch among themselves without any DICOM image.)
    from nidaan.server.inference import OnnxRuntimeBackend

    ran: list[np.ndarray] = []
    lock = threading.Lock()
    engine_infer = OnnxRuntimeBackend.infer

    def recording(self, model, batch):  # type: ignore[no-untyped-def]
        if model.name == "cxr_screen":
            with lock:
                ran.append(np.array(batch, copy=True))
        return engine_infer(self, model, batch)

    monkeypatch.setattr(OnnxRuntimeBackend, "infer", recording)
    # A batch goes as soon as all eight images are queued (preferred size 8); the oldest waits up
    # to 5 s for the rest, so that the two routes' requests reliably meet.
    cfg = make_config(tmp_path, idle_timeout_s=0.5)
    cfg.models.repository = _repository_with_delay(tmp_path, 5_000_000, "[ 8 ]")
    server = start_server(cfg)
    study = [synthetic_cxr(30 + i, rows=300, columns=300)[0] for i in range(2)]
    calls = [synthetic_cxr(40 + i, rows=300, columns=300)[0] for i in range(6)]
    sent = [("dicom", ds) for ds in study] + [("grpc", ds) for ds in calls]
    tensors = [(route, server.pipeline.prepare(ds)["cxr_screen"].tensor) for route, ds in sent]
    with lock:
        ran.clear()  # the server's warm-up runs
    client = Client(f"127.0.0.1:{server.api.port}")
    threads = [threading.Thread(target=client.analyze, args=([_bytes(ds)],)) for ds in calls]
    sender = threading.Thread(target=c_store, args=(server.scp.port, study))
    for t in [sender, *threads]:
        t.start()
    for t in [sender, *threads]:
        t.join(60)
    client.close()
    wait_until(lambda: sum(len(b) for b in ran) >= len(sent), 60, "8 radiographs run")

    def route_of(image: np.ndarray) -> str:
        distance, route = min((float(np.abs(image - t).max()), r) for r, t in tensors)
        assert distance < 1e-4, "a batch held an image that was not sent"
        return route

    batches = [[route_of(image) for image in batch] for batch in ran]
    assert sorted(r for b in batches for r in b) == sorted(r for r, _ in sent), batches
    mixed = [b for b in batches if {"dicom", "grpc"} <= set(b)]
    assert mixed, f"no batch held images from both routes: {batches}"


def test_error_codes_map_both_ways() -> None:
    assert status_code(QueueFullError("full")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(InferenceError("down")) == grpc.StatusCode.UNAVAILABLE
    assert status_code(InputError("bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(NidaanError("?")) == grpc.StatusCode.INTERNAL


def test_the_generated_protobuf_code_matches_the_proto(tmp_path: Path) -> None:
    proto = ROOT / "client" / "proto"
    shutil.copy(proto / "inference.proto", tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(tmp_path / "inference.proto"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    for name in ("inference_pb2.py", "inference_pb2.pyi"):
        assert (tmp_path / name).read_text() == (proto / name).read_text(), (
            f"client/proto/{name} is stale: run scripts/gen_proto.sh"
        )


def test_grpc_over_mutual_tls_admits_only_certified_clients(
    tmp_path: Path,
    start_server,
    pki: Path,  # type: ignore[no-untyped-def]
) -> None:
    cfg = make_config(tmp_path)
    cfg.dicom.tls_certificate = str(pki / "nidaan.crt")
    cfg.dicom.tls_private_key = str(pki / "nidaan.key")
    cfg.dicom.tls_ca = str(pki / "ca.crt")
    cfg.grpc.tls = True
    cfg.validate()
    server = start_server(cfg)
    target = f"localhost:{server.api.port}"
    ds, _ = synthetic_cxr(17, rows=300, columns=300)
    with Client(
        target, tls_ca=pki / "ca.crt", certificate=pki / "peer.crt", private_key=pki / "peer.key"
    ) as client:
        assert len(client.analyze([_bytes(ds)]).results) == 1
    refused = [
        Client(target, timeout_s=10),  # plain text to a TLS port
        Client(target, timeout_s=10, tls_ca=pki / "ca.crt"),  # no client certificate
        Client(  # a certificate the CA did not sign
            target,
            timeout_s=10,
            tls_ca=pki / "ca.crt",
            certificate=pki / "stranger.crt",
            private_key=pki / "stranger.key",
        ),
    ]
    for client in refused:
        with client, pytest.raises(InferenceError, match="UNAVAILABLE"):
            client.analyze([_bytes(ds)])
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'nidaan_grpc_requests_total{code="OK",method="Analyze"} 1.0' in metrics
