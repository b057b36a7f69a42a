"""DICOM TLS (PS3.15 B.9, BCP 195) with real peers: dcmtk's echoscu and storescp over TLS, with
certificates made by openssl for the test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from nidaan.core.config import Peer

from conftest import make_config
from factory import save, synthetic_cxr
from netutil import storescu
from peers import DCMTK_ENV, StoreSCP, free_port, need, wait_until


def _tls_config(tmp_path: Path, pki: Path, peers: list[Peer] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    plain = [Peer(p.ae_title, p.host, p.port) for p in peers or []]
    cfg = make_config(tmp_path, peers=plain, **kw)  # type: ignore[arg-type]
    cfg.peers = list(peers or [])
    cfg.dicom.tls_certificate = str(pki / "nidaan.crt")
    cfg.dicom.tls_private_key = str(pki / "nidaan.key")
    cfg.dicom.tls_ca = str(pki / "ca.crt")
    cfg.validate()
    return cfg


def _echo(port: int, *tls: str) -> int:
    run = subprocess.run(
        [need("echoscu"), *tls, "-aec", "NIDAAN", "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=30,
    )
    return run.returncode


def _tls_args(pki: Path, who: str = "peer") -> tuple[str, ...]:
    """dcmtk's options to speak TLS as ``who`` (its key and certificate) trusting our CA."""
    return ("+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "+cf", str(pki / "ca.crt"))


def test_tls_scp_accepts_certified_peers_only(
    tmp_path: Path,
    pki: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(_tls_config(tmp_path, pki))
    port = server.scp.port
    assert _echo(port, *_tls_args(pki)) == 0
    assert _echo(port) != 0  # plain TCP to a TLS port
    assert _echo(port, *_tls_args(pki, "stranger")) != 0  # a certificate our CA did not sign
    ds, _ = synthetic_cxr(61)
    sent = storescu(port, [save(ds, tmp_path / "x.dcm")], extra=_tls_args(pki))
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: server.state.study(ds.StudyInstanceUID), 30, "the study stored over TLS")


def test_reports_are_delivered_over_tls(
    tmp_path: Path,
    pki: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    pacs = StoreSCP(free_port(), tmp_path / "pacs", extra=_tls_args(pki))
    pacs.start()
    try:
        cfg = _tls_config(
            tmp_path,
            pki,
            peers=[Peer("PACS", "127.0.0.1", pacs.port, tls=True)],
            destinations=["PACS"],
        )
        server = start_server(cfg)
        ds, _ = synthetic_cxr(62)
        sent = storescu(server.scp.port, [save(ds, tmp_path / "x.dcm")], extra=_tls_args(pki))
        assert sent.returncode == 0, sent.stderr
        (report,) = pacs.wait_reports()
        assert pydicom.dcmread(report).StudyInstanceUID == ds.StudyInstanceUID
    finally:
        pacs.stop()


def test_the_status_page_over_tls_admits_only_certified_clients(tmp_path: Path, pki: Path) -> None:
    """http.tls: HTTPS with the node's certificate; a client without one our CA signed gets no
    page (403) but the probes answer it (the container's HEALTHCHECK works), one with it gets
    the page."""
    import ssl
    import urllib.error
    import urllib.request

    from nidaan.server.app import NidaanServer

    cfg = _tls_config(tmp_path, pki)
    cfg.http.bind, cfg.http.port, cfg.http.tls = "127.0.0.1", free_port(), True
    server = NidaanServer(cfg)
    server.start(http=True)
    url = f"https://127.0.0.1:{cfg.http.port}/"
    try:
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, context=anonymous, timeout=10)
        assert refused.value.code == 403, "a client without a certificate got the page"
        assert "client certificate" in refused.value.read().decode()
        # Probes (and the container's HEALTHCHECK) need no certificate.
        with urllib.request.urlopen(url + "healthz", context=anonymous, timeout=10) as r:
            assert r.status == 200
        from nidaan.server.healthcheck import main as healthcheck

        assert healthcheck([str(cfg.http.port)]) == 0
        certified = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        certified.load_cert_chain(str(pki / "peer.crt"), str(pki / "peer.key"))
        with urllib.request.urlopen(url, context=certified, timeout=10) as page:
            assert page.status == 200 and "Nidaan" in page.read().decode()
    finally:
        server.stop()
