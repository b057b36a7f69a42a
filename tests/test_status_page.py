"""The status page as a PACS administrator uses it, in a real browser (Debian's chromium driven by
Playwright, headless): sign in with the token, find the dead letter, press resend, and the report
arrives at the PACS (dcmtk's storescp) once it is back."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from nidaan.core.config import Peer
from nidaan.server.console import REFRESH_S

from conftest import make_config
from factory import sample_file, synthetic_cxr
from netutil import c_store
from peers import StoreSCP, free_port, need, stop, wait_until

TOKEN = "status-page-token-0123456789"


def _undecodable() -> pydicom.Dataset:
    """A real CR header with a JPEG 2000 codestream that starts right and then is garbage:
    stored and acknowledged, then quarantined at analysis and its study failed."""
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    return ds


def _section_rows(page, heading: str):  # type: ignore[no-untyped-def]
    """The data rows of the table that follows a section's heading (or its filters)."""
    if heading == "Recent studies":
        return page.locator("form.filters + table tr:has(td)")
    return page.locator(f"h2:text-is('{heading}') + table tr:has(td)")


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

        # The page refreshes itself: without a reload it comes to show the delivery to the peer
        # (ok, with its time) and no dead letter.
        assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == str(REFRESH_S)

        def peer_cells() -> list[str]:
            (peer,) = _section_rows(page, "Peers").all()
            return peer.locator("td").all_inner_texts()

        for _ in range(4):
            with page.expect_navigation(timeout=(REFRESH_S + 10) * 1000):
                pass  # the page's own refresh
            if peer_cells()[5].startswith("ok "):
                break
        cells = peer_cells()
        assert cells[0] == "PACS" and cells[5].startswith("ok 20"), cells
        assert "no dead letter" in page.inner_text("body")

        # A study from another modality that cannot be decoded: a failure with its reason, and
        # the instance in the quarantine with why.
        broken = _undecodable()
        (ok,) = c_store(server.scp.port, [broken], calling="WARD")
        assert ok.Status == 0x0000
        wait_until(
            lambda: (server.state.study(broken.StudyInstanceUID) or ("",))[0] == "failed",
            60,
            "the failed study",
        )
        page.goto(base + "/")
        (failure,) = _section_rows(page, "Failed studies").all()
        cells = failure.locator("td").all_inner_texts()
        assert cells[1] == "WARD" and "could not be analysed" in cells[2], cells
        (entry,) = _section_rows(page, "Quarantine").all()
        cells = entry.locator("td").all_inner_texts()
        assert cells[1] == "analysis" and "cannot be decoded" in cells[3], cells
        assert cells[5] == "kept"
        assert "1 object(s) in the quarantine" in page.inner_text("body")
        request = urllib.request.Request(
            base + "/status.json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.loads(r.read())["quarantine"] == {"entries": 1}

        # The calling-AE filter: WARD's study only.
        page.select_option("#filter-ae", "WARD")
        page.click("form.filters button")
        assert "ae=WARD" in page.url
        studies = _section_rows(page, "Recent studies").all()
        assert [r.locator("td").nth(2).inner_text() for r in studies] == ["WARD"]
        assert "failed" in studies[0].inner_text()
        page.select_option("#filter-ae", "MODALITY")
        page.click("form.filters button")
        studies = _section_rows(page, "Recent studies").all()
        assert [r.locator("td").nth(2).inner_text() for r in studies] == ["MODALITY"]
        page.select_option("#filter-state", "delivered")
        page.click("form.filters button")
        assert "state=delivered" in page.url
        assert "delivered" in page.locator("table").first.inner_text()
        page.select_option("#filter-state", "skipped")
        page.click("form.filters button")
        assert "no study matches" in page.inner_text("body")
        audit = (cfg.storage.data_dir / "audit.jsonl").read_text()
        assert '"event": "resend"' in audit
    finally:
        server.stop()
        if pacs.process is not None:
            stop(pacs.process)
