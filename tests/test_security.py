"""Who may talk to Nidaan, and how much they may send: each refusal is a proper DICOM answer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from nidaan.core.config import Peer

from conftest import make_config
from factory import sample_file, save, synthetic_cxr
from netutil import c_store, storescu
from peers import DCMTK_ENV, need


def _echo(port: int, calling: str) -> int:
    run = subprocess.run(
        [need("echoscu"), "-aet", calling, "-aec", "NIDAAN", "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=30,
    )
    return run.returncode


def test_only_known_peers_from_their_hosts_may_associate(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = make_config(
        tmp_path, peers=[Peer("PACS", "127.0.0.1", 104), Peer("FARAWAY", "192.0.2.10", 104)]
    )
    cfg.dicom.require_known_callers = True
    server = start_server(cfg)
    assert _echo(server.scp.port, "PACS") == 0
    assert _echo(server.scp.port, "STRANGER") != 0  # unknown AE title
    assert _echo(server.scp.port, "FARAWAY") != 0  # known title, wrong host
    ds, _ = synthetic_cxr(31)
    run = storescu(server.scp.port, [save(ds, tmp_path / "x.dcm")], calling="STRANGER")
    assert run.returncode != 0
    assert server.state.study(ds.StudyInstanceUID) is None  # nothing stored from a stranger


def test_limits_refuse_with_a_status_and_keep_serving(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = make_config(tmp_path)
    cfg.dicom.max_pixels = 500_000
    cfg.dicom.max_instances_per_study = 2
    server = start_server(cfg)
    big, _ = synthetic_cxr(32, rows=1000, columns=600)  # 600,000 pixels
    (status,) = c_store(server.scp.port, [big])
    assert 0xC000 <= status.Status <= 0xCFFF and "exceed" in status.ErrorComment
    assert len(list((cfg.storage.data_dir / "quarantine").glob("*.json"))) == 1
    study = generate_uid()
    small = [synthetic_cxr(33 + i, rows=300, columns=300, study_uid=study)[0] for i in range(3)]
    statuses = [s.Status for s in c_store(server.scp.port, small)]
    assert statuses == [0x0000, 0x0000, 0xA700]  # the third exceeds the per-study limit


def test_overflowing_dimensions_are_refused_before_decoding(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(make_config(tmp_path))
    ds = pydicom.dcmread(sample_file("RG1_UNCR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 65535  # 2.8e14 pixels: would overflow a 32-bit product
    (status,) = c_store(server.scp.port, [ds])
    assert 0xC000 <= status.Status <= 0xCFFF and "exceed" in status.ErrorComment
    # ...and the server still serves a good instance on the next association.
    good, _ = synthetic_cxr(34)
    (ok,) = c_store(server.scp.port, [good])
    assert ok.Status == 0x0000


def test_nearly_full_disk_refuses_with_out_of_resources_and_keeps_nothing(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = make_config(tmp_path)
    cfg.dicom.min_free_bytes = 10**18  # more than any disk has
    server = start_server(cfg)
    ds, _ = synthetic_cxr(35)
    (status,) = c_store(server.scp.port, [ds])
    assert status.Status == 0xA700 and "disk" in status.ErrorComment
    assert [p for p in (cfg.storage.data_dir / "spool").rglob("*") if p.is_file()] == []
    assert server.state.study(ds.StudyInstanceUID) is None


def test_database_error_answers_out_of_resources_and_leaves_no_file(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlite3

    server = start_server(make_config(tmp_path))

    def broken(*args: object, **kwargs: object) -> bool:
        # Fault injection: SQLite failing (disk I/O error, lock) cannot be provoked reliably as
        # root on a healthy disk, so the state store's write is made to fail instead.
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(server.state, "add_instance", broken)
    ds, _ = synthetic_cxr(36)
    (status,) = c_store(server.scp.port, [ds])
    assert status.Status == 0xA700
    spool = server.spool.root
    assert [p for p in spool.rglob("*") if p.is_file()] == []


def test_association_limit_rejects_the_one_too_many(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    from pynetdicom import AE

    cfg = make_config(tmp_path)
    cfg.dicom.max_associations = 1
    server = start_server(cfg)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", server.scp.port, ae_title="NIDAAN")
    try:
        assert first.is_established
        second = ae.associate("127.0.0.1", server.scp.port, ae_title="NIDAAN")
        assert not second.is_established and second.is_rejected
    finally:
        first.release()


def test_rows_encoded_as_ul_with_an_impossible_value_is_refused(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = make_config(tmp_path)
    server = start_server(cfg)
    ds, _ = synthetic_cxr(37, rows=256, columns=256)
    ds.Rows = 4_000_000_000  # US cannot hold it: written as UL, as a hostile sender could
    ds["Rows"].VR = "UL"
    (status,) = c_store(server.scp.port, [ds])
    assert status.Status != 0x0000 and status.Status >> 12 in (0xA, 0xC)
    assert list((cfg.storage.data_dir / "quarantine").glob("*.json"))
