"""The HTTP side of a running server: /healthz for probes, /metrics for Prometheus, and a status
page (HTML and JSON) that counts what the node does without showing patient data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from nidaan.core.config import Config, Peer

from conftest import make_config
from factory import sample_file, synthetic_cxr
from netutil import c_store
from peers import StoreSCP, free_port, stop, unavailable, wait_until

if TYPE_CHECKING:
    from nidaan.server.app import NidaanServer

MB = 1 << 20


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@contextlib.contextmanager
def _serving(cfg: Config) -> Iterator[tuple[NidaanServer, int]]:
    """An in-process server of ``cfg`` with its HTTP side on a free loopback port: (server,
    HTTP port); stopped after."""
    from nidaan.server.app import NidaanServer

    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    server = NidaanServer(cfg)
    server.start(http=True)
    try:
        yield server, cfg.http.port
    finally:
        server.stop()


def test_health_metrics_and_status_page(tmp_path: Path) -> None:
    with _serving(make_config(tmp_path)) as (server, port):
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
    with pytest.raises(urllib.error.URLError):
        _get(port, "/healthz")


def _metric(metrics: str, name: str) -> float:
    """The value of one sample (``name`` with its labels) in Prometheus text."""
    line = next(x for x in metrics.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def _undecodable() -> pydicom.Dataset:
    """A real CR header with a JPEG 2000 codestream that starts right and then is garbage."""
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    return ds


@contextlib.contextmanager
def _small_disk(folder: Path, size_mb: int) -> Iterator[Path]:
    """A real file system of ``size_mb`` MiB (tmpfs) mounted on ``folder`` (needs root)."""
    folder.mkdir(parents=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        unavailable("mounting a small file system needs root and mount(8)")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_readyz_names_a_full_and_a_read_only_data_dir(tmp_path: Path) -> None:
    """The data dir on a real 16 MiB file system: filled past dicom.min_free_bytes, the node
    is not ready and says why (and refuses instances); with its spool read-only, it says the
    data dir is not writable; alive all the while (/healthz), and ready again once the disk is."""
    from nidaan.server.app import NidaanServer

    cfg = make_config(tmp_path)
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    cfg.dicom.min_free_bytes = 6 * MB
    with _small_disk(cfg.storage.data_dir, 16):
        server = NidaanServer(cfg)
        server.start(http=True)
        port = cfg.http.port
        filler = cfg.storage.data_dir / "filler"
        try:
            assert _get(port, "/readyz")[0] == 200
            free = shutil.disk_usage(cfg.storage.data_dir).free
            filler.write_bytes(b"\0" * (free - 4 * MB))  # 4 MiB left, fewer than 6
            code, _, body = _get(port, "/readyz")
            spool = json.loads(body)["checks"]["spool"]
            assert code == 503 and "dicom.min_free_bytes" in spool and "refused" in spool
            assert _get(port, "/healthz")[0] == 200  # alive, only not ready
            ds, _ = synthetic_cxr(63, rows=300, columns=300)
            (refused,) = c_store(server.scp.port, [ds])
            assert refused.Status != 0x0000  # the sender is told, and may send it again later
            filler.unlink()
            assert _get(port, "/readyz")[0] == 200

            # The spool's file system turns read-only (as one does after I/O errors): here an
            # empty read-only tmpfs over the folder instances are first written to.
            staging = server.spool.staging_dir
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(staging)], check=True
            )
            try:
                code, _, body = _get(port, "/readyz")
                spool = json.loads(body)["checks"]["spool"]
                assert code == 503
                assert f"data dir {cfg.storage.data_dir} not writable" in spool, spool
                assert "Read-only file system" in spool
            finally:
                subprocess.run(["umount", str(staging)], check=True)
            assert _get(port, "/readyz")[0] == 200
        finally:
            server.stop()


def test_a_stopped_worker_thread_makes_the_node_not_ready(tmp_path: Path) -> None:
    with _serving(make_config(tmp_path)) as (server, port):
        assert _get(port, "/readyz")[0] == 200
        server._queue.put(None)  # how a worker is told to end when the node stops
        code, _, body = wait_until(
            lambda: r if (r := _get(port, "/readyz"))[0] != 200 else None, 30, "a 503"
        )
        threads = json.loads(body)["checks"]["threads"]
        assert code == 503 and threads.startswith("thread nidaan-worker-"), threads
        assert threads.endswith("has stopped")
        assert json.loads(body)["checks"]["spool"] == "ok"
        assert _get(port, "/healthz")[0] == 503


def test_metrics_count_dead_letters_and_quarantine_and_time_report_and_delivery(
    tmp_path: Path,
) -> None:
    """One study goes to a PACS that takes it and to one that is down (a dead letter after one
    try), one instance cannot be decoded (quarantined): each shows in /metrics, and the report
    and delivery stages were timed."""
    from nidaan.server.app import NidaanServer

    pacs_port, gone_port = free_port(), free_port()
    cfg = make_config(
        tmp_path,
        peers=[
            Peer("PACS", "127.0.0.1", pacs_port, objects=["sr"]),
            Peer("GONE", "127.0.0.1", gone_port, objects=["sr"]),
        ],
        destinations=["PACS", "GONE"],
    )
    cfg.reports.max_attempts = 1
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    pacs = StoreSCP(pacs_port, tmp_path / "pacs", aet="PACS")
    pacs.start()
    server = NidaanServer(cfg)
    server.start(http=True)
    port = cfg.http.port
    try:
        metrics = _get(port, "/metrics")[2]
        assert _metric(metrics, 'nidaan_outbox_items{state="dead"}') == 0
        assert _metric(metrics, "nidaan_quarantine_entries") == 0
        ds, _ = synthetic_cxr(64, rows=300, columns=300)
        broken = _undecodable()
        assert [s.Status for s in c_store(server.scp.port, [ds, broken])] == [0, 0]
        wait_until(lambda: pacs.reports(), 60, "the report at the PACS")
        wait_until(lambda: server.state.outbox("dead"), 60, "the dead letter to GONE")
        wait_until(
            lambda: (server.state.study(broken.StudyInstanceUID) or ("",))[0] == "failed",
            60,
            "the undecodable study to fail",
        )

        def delivered() -> str | None:
            m = _get(port, "/metrics")[2]
            return m if _metric(m, 'nidaan_outbox_items{state="delivered"}') == 1 else None

        metrics = wait_until(delivered, 30, "the delivery in the metrics")
        assert _metric(metrics, 'nidaan_outbox_items{state="dead"}') == 1
        assert _metric(metrics, 'nidaan_outbox_items{state="queued"}') == 0
        assert _metric(metrics, "nidaan_quarantine_entries") == 1
        for stage in ("report", "delivery"):
            count = _metric(metrics, f'nidaan_stage_seconds_count{{stage="{stage}"}}')
            total = _metric(metrics, f'nidaan_stage_seconds_sum{{stage="{stage}"}}')
            assert count >= 1 and total > 0, (stage, count, total)
    finally:
        server.stop()
        if pacs.process is not None:
            stop(pacs.process)
