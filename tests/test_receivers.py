"""Receiving in several processes behind one DICOM port: connections spread evenly, a study sent
over associations in different receivers is assembled as one, the node's association limit and
TLS hold across them, rejections are logged and counted, and a receiver that dies is replaced."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from nidaan.core.config import Peer

from conftest import make_config
from factory import synthetic_ct_series, synthetic_cxr
from netutil import c_store
from peers import DCMTK_ENV, StoreSCP, free_port, need, wait_until
from srutil import evidence

pytestmark = pytest.mark.peers  # receiver processes


def _associate(port: int, calling: str = "MODALITY", tls: object = None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")  # CT Image
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")  # CR Image
    return ae.associate("127.0.0.1", port, ae_title="NIDAAN", tls_args=tls)


def _rejected(server, reason: str) -> float:  # type: ignore[no-untyped-def]
    return (
        server.metrics.registry.get_sample_value(
            "nidaan_associations_rejected_total", {"reason": reason}
        )
        or 0.0
    )


def test_one_study_over_two_receivers_is_assembled_as_one_report(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    pacs = StoreSCP(free_port(), tmp_path / "pacs")
    pacs.start()
    try:
        cfg = make_config(
            tmp_path,
            peers=[Peer("PACS", "127.0.0.1", pacs.port)],
            destinations=["PACS"],
            receivers=2,
            idle_timeout_s=1.0,
        )
        server = start_server(cfg)
        slices, _ = synthetic_ct_series(7, (1,), slices=6, size=128)
        first, second = _associate(server.scp.port), _associate(server.scp.port)
        assert first.is_established and second.is_established
        # Handed to the receiver with the fewest connections: one each.
        assert sorted(r.open for r in server.scp._receivers) == [1, 1]
        for i, ds in enumerate(slices):
            status = (first if i % 2 else second).send_c_store(ds)
            assert status.Status == 0x0000
        first.release()
        second.release()
        (report,) = pacs.wait_reports(1, timeout=60)
        sr = pydicom.dcmread(report)
        assert sr.StudyInstanceUID == slices[0].StudyInstanceUID
        assert evidence(sr) == {ds.SOPInstanceUID for ds in slices}  # every slice, one report
        wait_until(
            lambda: (server.state.study(sr.StudyInstanceUID) or ("",))[0] == "delivered",
            30,
            "the study to be delivered",
        )
        assert len(pacs.wait_reports(1)) == 1  # not one per receiver
    finally:
        pacs.stop()


def test_the_node_s_association_limit_holds_across_receivers_and_rejections_are_counted(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_config(tmp_path, receivers=2)
    cfg.dicom.max_associations = 2
    server = start_server(cfg)
    held = [_associate(server.scp.port), _associate(server.scp.port)]
    assert all(a.is_established for a in held)
    with caplog.at_level(logging.WARNING, logger="nidaan"):
        third = _associate(server.scp.port)
        assert third.is_rejected  # each receiver alone would have room for it
        wait_until(lambda: _rejected(server, "too many associations") == 1, 10, "the count")
    assert any(
        "rejected an association" in r.getMessage() and "too many associations" in r.getMessage()
        for r in caplog.records
    ), "the rejection was not logged at warning level"
    for a in held:
        a.release()
    wait_until(lambda: sum(r.open for r in server.scp._receivers) == 0, 10, "the releases")
    again = _associate(server.scp.port)
    assert again.is_established  # the limit counts open associations, not past ones
    again.release()


def test_an_unknown_caller_is_rejected_logged_and_counted_by_a_receiver(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = make_config(tmp_path, peers=[Peer("PACS", "127.0.0.1", 104)], receivers=2)
    cfg.dicom.require_known_callers = True
    server = start_server(cfg)
    with caplog.at_level(logging.WARNING, logger="nidaan"):
        assert _associate(server.scp.port, calling="STRANGER").is_rejected
        wait_until(
            lambda: _rejected(server, "calling AE title not recognised") == 1, 10, "the count"
        )
        echo = subprocess.run(
            [need("echoscu"), "-aet", "PACS", "-aec", "WRONG", "127.0.0.1", str(server.scp.port)],
            env=DCMTK_ENV,
            capture_output=True,
            timeout=30,
        )
        assert echo.returncode != 0
        wait_until(
            lambda: _rejected(server, "called AE title not recognised") == 1, 10, "the count"
        )
    messages = [r.getMessage() for r in caplog.records if r.name == "nidaan.scp"]
    assert any("'STRANGER'" in m and "calling AE title not recognised" in m for m in messages)


def test_a_killed_receiver_is_replaced_and_the_node_keeps_receiving(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(make_config(tmp_path, receivers=2))
    victim = server.scp.pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: server.scp.restarts == 1, 10, "the receiver to be started again")
    wait_until(lambda: not server.health(), 30, "the node to be healthy")
    assert victim not in server.scp.pids() and len(server.scp.pids()) == 2
    for seed in (41, 42, 43):  # whichever receiver gets them
        ds, _ = synthetic_cxr(seed, rows=64, columns=64)
        (status,) = c_store(server.scp.port, [ds])
        assert status.Status == 0x0000
        assert server.state.study(ds.StudyInstanceUID) is not None


def test_tls_is_served_by_the_receivers(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
    pki: Path,
) -> None:
    import ssl

    cfg = make_config(tmp_path, receivers=2)
    cfg.dicom.tls_certificate = str(pki / "nidaan.crt")
    cfg.dicom.tls_private_key = str(pki / "nidaan.key")
    cfg.dicom.tls_ca = str(pki / "ca.crt")
    server = start_server(cfg)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    client.load_cert_chain(str(pki / "peer.crt"), str(pki / "peer.key"))
    assoc = _associate(server.scp.port, tls=(client, "localhost"))
    assert assoc.is_established
    ds, _ = synthetic_cxr(44, rows=64, columns=64)
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    plain = _associate(server.scp.port)  # no TLS: the handshake fails, the node goes on
    assert not plain.is_established
    assert server.state.study(ds.StudyInstanceUID) is not None
    assert not server.health()
