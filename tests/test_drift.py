"""Drift (issue 14 item 4): each model's probability distribution and present-rate per finding in
the metrics, labelled by model, finding and modality only, and the last day's present-rate on the
status page beside the rate the model card expects (kept across a restart)."""

from __future__ import annotations

import json
import tomllib
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from nidaan.client import Client
from nidaan.core.config import Config

from conftest import MODELS, make_config
from factory import synthetic_cxr
from netutil import c_store
from peers import free_port, wait_until

DRIFT_METRICS = (
    "nidaan_finding_probability",
    "nidaan_findings_analysed",
    "nidaan_findings_present",
)


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Each sample of a metric (by its sorted labels)."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def _key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _start(cfg: Config):  # type: ignore[no-untyped-def]
    from nidaan.server.app import NidaanServer

    server = NidaanServer(cfg)
    server.start(http=True)
    return server


def test_present_rates_in_metrics_and_status_page_beside_the_cards(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, idle_timeout_s=0.5)
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    server = _start(cfg)
    port = cfg.http.port
    # Known images: two radiographs with a planted nodule, two without (one over gRPC).
    sent = [
        synthetic_cxr(81, nodule=True, rows=320, columns=288)[0],
        synthetic_cxr(82, nodule=True, rows=320, columns=288)[0],
        synthetic_cxr(83, rows=320, columns=288)[0],
    ]
    clean, _ = synthetic_cxr(84, rows=320, columns=288)
    try:
        for ds in sent:
            assert c_store(server.scp.port, [ds])[0].Status == 0
        uids = [str(ds.StudyInstanceUID) for ds in sent]
        wait_until(
            lambda: all(server.state.study(u)[0] == "reported" for u in uids), 60, "3 reported"
        )
        with Client(f"127.0.0.1:{server.api.port}") as client:
            data = _bytes(clean)
            response = client.analyze([data])
            assert response.results[0].model == "cxr_screen"
            client.analyze([data])  # the same image again: counted once
        text = _get(port, "/metrics")
        cr = {"model": "cxr_screen", "modality": "CR"}
        analysed = _samples(text, "nidaan_findings_analysed_total")
        present = _samples(text, "nidaan_findings_present_total")
        assert analysed[_key(**cr, finding="nodule")] == 4
        assert analysed[_key(**cr, finding="tb")] == 4
        assert present[_key(**cr, finding="nodule")] == 2
        assert present[_key(**cr, finding="tb")] == 0
        counts = _samples(text, "nidaan_finding_probability_count")
        assert counts[_key(**cr, finding="nodule")] == 4
        # Two of the four nodule probabilities are high, two low (the planted nodules).
        buckets = _samples(text, "nidaan_finding_probability_bucket")
        assert buckets[_key(**cr, finding="nodule", le="0.5")] == 2
        assert buckets[_key(**cr, finding="nodule", le="1.0")] == 4
        # Labels are model, finding and modality: nothing of a patient or a study.
        for family in text_string_to_metric_families(text):
            if family.name in DRIFT_METRICS:
                for s in family.samples:
                    assert set(s.labels) - {"le"} == {"model", "finding", "modality"}, s
        for ds in [*sent, clean]:
            for value in (ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientID, ds.PatientName):
                assert str(value) not in text
        status = json.loads(_get(port, "/status.json"))
        rows = {(d["model"], d["finding"]): d for d in status["drift"]["findings"]}
        nodule = rows[("cxr_screen", "nodule")]
        assert (nodule["analysed"], nodule["present"], nodule["present_rate"]) == (4, 2, 0.5)
        assert nodule["expected_present_rate"] == 0.33
        assert nodule["expected_prevalence"] == 0.3367
        assert rows[("cxr_screen", "tb")]["present_rate"] == 0.0
        assert rows[("ct_nodule", "nodule")]["analysed"] == 0
        assert rows[("ct_nodule", "nodule")]["present_rate"] is None
        assert status["drift"]["window_s"] == 86400
        page = _get(port, "/")
        assert "Drift (last 24 h)" in page
        assert "<td>cxr_screen</td><td>nodule</td><td>4</td><td>2</td><td>50.0 %</td>" in page
        assert "<td>33.0 %</td><td>33.7 %</td>" in page  # the card's rates beside it
        for ds in sent:
            assert str(ds.StudyInstanceUID) not in json.dumps(status["drift"])
    finally:
        server.stop()
        server.http.stop()  # type: ignore[union-attr]
    # The day's window lives in the state database: a restarted node still shows it.
    server = _start(cfg)
    try:
        status = json.loads(_get(port, "/status.json"))
        rows = {(d["model"], d["finding"]): d for d in status["drift"]["findings"]}
        assert (
            rows[("cxr_screen", "nodule")]["analysed"],
            rows[("cxr_screen", "nodule")]["present"],
        ) == (4, 2)
        # The counters start again (Prometheus counts from a restart); the rates do not.
        assert "nidaan_findings_analysed_total{" not in _get(port, "/metrics")
    finally:
        server.stop()
        server.http.stop()  # type: ignore[union-attr]


def test_sidecar_expected_rates_reproduce_from_the_cards_held_out_figures() -> None:
    """The reference rates are not invented: each is the card's held-out set (metrics.json)
    restated, prevalence = positives / images, present-rate = (true + false positives) /
    images at the card's sensitivity and specificity."""
    from nidaan.server.model_repository import load_repository

    checked = 0
    for model in load_repository(MODELS, check_onnx=False):
        measured = json.loads((model.directory / "metrics.json").read_text())["test"]
        sidecar = tomllib.loads((model.directory / "nidaan.toml").read_text())
        card = model.card.read_text()
        assert "expected_present_rate" in card and "expected_prevalence" in card
        for f in model.findings:
            m = measured[f.label]
            n = m["positives"] + m["negatives"]
            tp = round(m["sensitivity"] * m["positives"])
            fp = round((1 - m["specificity"]) * m["negatives"])
            assert f.expected_prevalence == round(m["positives"] / n, 4)
            assert f.expected_present_rate == round((tp + fp) / n, 4)
            assert f.threshold == m["threshold"]  # the rates hold at this threshold
            assert any(x["label"] == f.label for x in sidecar["findings"])
            checked += 1
    assert checked == 3


def _bytes(ds) -> bytes:  # type: ignore[no-untyped-def]
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_drift_rows_are_written_off_the_callers_thread_in_batches_and_flushed_at_close(
    tmp_path: Path,
) -> None:
    """The callers only queue their rows; one thread writes what queued meanwhile in one
    transaction, counts only rows not seen before, and close() writes what is still queued
    (a server stopping loses no statistics)."""
    import threading as _threading

    from nidaan.pacs_bridge.state import StateStore
    from nidaan.server.drift import DriftRecorder

    state = StateStore(tmp_path / "state.sqlite3")
    writes: list[int] = []
    gate = _threading.Event()
    counted: list[tuple] = []

    def record(rows):  # type: ignore[no-untyped-def]
        gate.wait(10)  # the first write is slow: what arrives meanwhile must share the next
        writes.append(len(rows))
        return state.record_findings(rows)

    recorder = DriftRecorder(record, counted.append)
    rows = [
        (f"img{i}", "cxr_screen", "nodule", "CR", i % 2 == 0, 0.1 * (i % 10)) for i in range(40)
    ]
    for row in rows:
        recorder.submit([row])
    recorder.submit([rows[0]])  # the same image again: recorded once, counted once
    gate.set()
    recorder.close()
    assert sum(writes) == 41 and len(writes) < 41, writes
    assert sorted(counted) == sorted(rows)
    assert state.finding_rates(0) == [("cxr_screen", "nodule", 40, 20)]
    state.close()
