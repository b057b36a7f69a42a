"""The HTTP side of a running server: /healthz for probes, /metrics for Prometheus, and a status
page (HTML and JSON) that counts what the node does without showing patient data."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store
from peers import free_port, wait_until


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_health_metrics_and_status_page(tmp_path: Path) -> None:
    from nidaan.server.app import NidaanServer

    cfg = make_config(tmp_path)
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    server = NidaanServer(cfg)
    server.start(http=True)
    port = cfg.http.port
    try:
        assert _get(port, "/healthz")[0] == 200
        assert json.loads(_get(port, "/healthz")[2]) == {"status": "serving"}
        ds, _ = synthetic_cxr(60, rows=300, columns=300)
        (ok,) = c_store(server.scp.port, [ds])
        assert ok.Status == 0x0000

        def analysed() -> dict | None:
            status = json.loads(_get(port, "/status.json")[2])
            return status if status["inference"]["models"]["cxr_screen"]["images"] else None

        status = wait_until(analysed, 30, "the study in the status")
        assert status["status"] == "serving"
        assert status["node"]["dicom_port"] == server.scp.port
        assert {m["name"]: m["not_for_diagnosis"] for m in status["models"]} == {
            "ct_nodule": True,
            "cxr_screen": True,
        }
        assert sum(status["studies"].values()) == 1
        assert status["inference"]["models"]["cxr_screen"]["images"] == 1
        code, kind, page = _get(port, "/")
        assert code == 200 and kind.startswith("text/html")
        assert "cxr_screen" in page and "NOT FOR DIAGNOSIS" in page
        code, kind, metrics = _get(port, "/metrics")
        assert code == 200 and kind.startswith("text/plain")
        assert 'nidaan_instances_received_total{status="0x0000"} 1.0' in metrics
        # Every stage this study went through was timed (no destination: nothing delivered).
        for stage in ("receive", "decode", "preprocess", "queue", "inference"):
            count = f'nidaan_stage_seconds_count{{stage="{stage}"}} '
            line = next(x for x in metrics.splitlines() if x.startswith(count))
            assert float(line.split()[-1]) >= 1, line
        assert 'nidaan_stage_seconds_count{stage="delivery"} 0.0' in metrics
        assert 'nidaan_outbox_items{state="queued"} 0.0' in metrics
        assert "nidaan_quarantine_entries 0.0" in metrics
        # Ready: models, spool, state database, threads.
        code, _, body = _get(port, "/readyz")
        ready = json.loads(body)
        assert code == 200 and ready["status"] == "ready"
        assert ready["checks"] == {"models": "ok", "spool": "ok", "state": "ok", "threads": "ok"}
        server.config.dicom.min_free_bytes = 1 << 62  # the disk is "full"
        code, _, body = _get(port, "/readyz")
        assert code == 503 and "dicom.min_free_bytes" in json.loads(body)["checks"]["spool"]
        assert _get(port, "/healthz")[0] == 200  # alive, only not ready
        server.config.dicom.min_free_bytes = 0
        for text in (page, json.dumps(status)):
            for phi in (ds.PatientName, ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID):
                assert str(phi) not in text
        assert _get(port, "/nothing")[0] == 404
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        _get(port, "/healthz")
