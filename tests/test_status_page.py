"""The status page as a PACS administrator uses it, in a real browser (Debian's chromium driven by
Playwright, headless): sign in with the token, find the dead letter, press resend, and the report
arrives at the PACS (dcmtk's storescp) once it is back."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nidaan.core.config import Peer

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store
from peers import StoreSCP, free_port, need, stop, wait_until

TOKEN = "status-page-token-0123456789"


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    chromium = need("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def test_a_dead_letter_is_resent_from_the_page_and_arrives(tmp_path: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from nidaan.server.app import NidaanServer

    pacs_port = free_port()
    cfg = make_config(
        tmp_path,
        peers=[Peer("PACS", "127.0.0.1", pacs_port, objects=["sr"])],
        destinations=["PACS"],
    )
    cfg.reports.max_attempts = 1  # the PACS is down: a dead letter at once
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    (tmp_path / "tokens").write_text(f"# the status page\n{TOKEN}\n")
    cfg.http.tokens_file = str(tmp_path / "tokens")
    cfg.http.echo_interval_s = 0.5
    server = NidaanServer(cfg)
    server.start(http=True)
    pacs = StoreSCP(pacs_port, tmp_path / "pacs", aet="PACS")
    base = f"http://127.0.0.1:{cfg.http.port}"
    try:
        ds, _ = synthetic_cxr(62, rows=400, columns=360)
        (ok,) = c_store(server.scp.port, [ds])
        assert ok.Status == 0x0000
        wait_until(lambda: server.state.outbox("dead"), 60, "the dead letter")

        # Without the token: refused (probes stay open).
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/", timeout=10)
        assert refused.value.code == 401
        assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200

        page = browser.new_page()
        page.goto(f"{base}/?token={TOKEN}")  # signs in: a cookie, and the token leaves the URL
        assert page.url == base + "/"
        text = page.inner_text("body")
        assert "Dead letters" in text and "PACS" in text
        row = page.locator("tr", has=page.locator("button.resend"))
        assert row.count() == 1
        assert "PACS" in row.inner_text()

        # The peer is down, and the page says so.
        def echo_failed() -> bool:
            page.reload()
            return "no association" in page.inner_text("body")

        wait_until(echo_failed, 30, "the failed C-ECHO on the page")
        assert str(ds.PatientName) not in page.content()
        assert str(ds.PatientID) not in page.content()
        assert str(ds.StudyInstanceUID) not in page.content()

        pacs.start()  # the PACS is back
        page.click("button.resend")
        page.wait_for_load_state()
        wait_until(lambda: pacs.reports(), 60, "the report at the PACS")
        (report,) = pacs.reports()
        import pydicom

        assert pydicom.dcmread(report).StudyInstanceUID == ds.StudyInstanceUID

        def delivered() -> bool:
            page.reload()
            return "no dead letter" in page.inner_text("body")

        wait_until(delivered, 30, "the page to show no dead letter")
        page.select_option("#filter-state", "delivered")
        page.click("form.filters button")
        assert "state=delivered" in page.url
        assert "delivered" in page.locator("table").first.inner_text()
        page.select_option("#filter-state", "failed")
        page.click("form.filters button")
        assert "no study matches" in page.inner_text("body")
        audit = (cfg.storage.data_dir / "audit.jsonl").read_text()
        assert '"event": "resend"' in audit
    finally:
        server.stop()
        if pacs.process is not None:
            stop(pacs.process)
