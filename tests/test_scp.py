"""The DICOM node with real senders and receivers: dcmtk storescu/echoscu/storescp, pynetdicom."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from nidaan.core.config import Config, Peer
from nidaan.server.app import NidaanServer

from conftest import make_config
from factory import sample_file, save, synthetic_cxr
from netutil import c_store, storescu
from peers import DCMTK_ENV, NIDAAN, StoreSCP, free_port, need, wait_until
from srutil import evidence


class Pacs(StoreSCP):
    """The PACS reports go to, and a Nidaan config pointing at it."""

    def config(self, tmp_path: Path, **kwargs: float) -> Config:
        """A Nidaan config that sends reports here."""
        return make_config(
            tmp_path, peers=[Peer("PACS", "127.0.0.1", self.port)], destinations=["PACS"], **kwargs
        )


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(free_port(), tmp_path / "pacs")
    yield p
    p.stop()


def wait_state(server: NidaanServer, study_uid: str, state: str, timeout: float = 30) -> None:
    """Wait for a study's state (the PACS may hold a report a moment before it is recorded)."""
    wait_until(
        lambda: (server.state.study(study_uid) or ("",))[0] == state,
        timeout,
        f"the study to be {state}",
    )


def test_c_echo_and_called_ae_check(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(make_config(tmp_path))
    echo = need("echoscu")
    ok = subprocess.run(
        [echo, "-aec", "NIDAAN", "127.0.0.1", str(server.scp.port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run(
        [echo, "-aec", "SOMEONE_ELSE", "127.0.0.1", str(server.scp.port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=30,
    )
    assert wrong.returncode != 0  # association rejected: called AE title not recognised


def _broken_j2k(study_uid: str) -> pydicom.Dataset:
    broken = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.StudyInstanceUID = study_uid
    # A JPEG 2000 codestream that starts right and then is garbage.
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    assert broken.file_meta.TransferSyntaxUID == JPEG2000Lossless
    return broken


def _analysis_quarantine(cfg: Config) -> list[dict]:
    entries = [
        json.loads(p.read_text()) | {"file": p.with_suffix(".dcm")}
        for p in (cfg.storage.data_dir / "quarantine").glob("*.json")
    ]
    return [e for e in entries if e["stage"] == "analysis"]


def test_undecodable_image_fails_is_quarantined_and_server_keeps_serving(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    """Decoding follows Success (nothing slow runs on an association's thread): an acknowledged
    image that cannot be decoded becomes a visible failure: the study's state and reason, the
    quarantine (with the bytes as sent), the audit log and the metrics."""
    pacs.start()
    cfg = pacs.config(tmp_path)
    server = start_server(cfg)
    broken = _broken_j2k(generate_uid())
    (status,) = c_store(server.scp.port, [broken])
    assert status.Status == 0x0000, f"status 0x{status.Status:04X}"  # stored and recorded
    wait_state(server, broken.StudyInstanceUID, "failed")
    _, reason, _ = server.state.study(broken.StudyInstanceUID)
    assert "1 image(s) could not be analysed" in reason and "cannot be decoded" in reason
    (entry,) = wait_until(lambda: _analysis_quarantine(cfg), 10, "the quarantine entry")
    assert "cannot be decoded" in entry["reason"] and entry["status"].startswith("0xC")
    kept = pydicom.dcmread(entry["file"])
    assert kept.SOPInstanceUID == broken.SOPInstanceUID  # the bytes as sent, not lost
    audit = [json.loads(line) for line in (cfg.storage.data_dir / "audit.jsonl").open()]
    failed = [e for e in audit if e["event"] == "instance_failed"]
    assert [e["sop_instance"] for e in failed] == [broken.SOPInstanceUID]
    assert server.metrics.images_failed._value.get() == 1
    assert pacs.reports() == []  # no report of nothing

    # The next study is served as usual, end to end.
    good, _ = synthetic_cxr(7, nodule=True)
    done = storescu(server.scp.port, [save(good, tmp_path / "good.dcm")])
    assert done.returncode == 0, done.stderr
    pacs.wait_reports()
    wait_state(server, good.StudyInstanceUID, "delivered")


def test_a_study_with_one_undecodable_image_reports_the_others(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    """One bad image does not cost the study its report: the good one is analysed and
    delivered, and the study's reason names the image that was not."""
    pacs.start()
    cfg = pacs.config(tmp_path)
    server = start_server(cfg)
    good, _ = synthetic_cxr(8, nodule=True)
    broken = _broken_j2k(good.StudyInstanceUID)
    broken.PatientID, broken.PatientName = good.PatientID, good.PatientName
    statuses = c_store(server.scp.port, [good, broken])
    assert [s.Status for s in statuses] == [0x0000, 0x0000]
    (report,) = pacs.wait_reports()
    wait_state(server, good.StudyInstanceUID, "delivered")
    assert evidence(pydicom.dcmread(report)) == {good.SOPInstanceUID}
    _, reason, _ = server.state.study(good.StudyInstanceUID)
    assert "1 image(s) could not be analysed" in reason, reason
    (entry,) = _analysis_quarantine(cfg)
    assert pydicom.dcmread(entry["file"]).SOPInstanceUID == broken.SOPInstanceUID


def test_non_image_objects_are_accepted_and_not_analysed(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(make_config(tmp_path))
    sr = pydicom.dcmread(sample_file("test-SR.dcm"))
    (status,) = c_store(server.scp.port, [sr])
    assert status.Status == 0x0000
    wait_state(server, sr.StudyInstanceUID, "skipped")


def test_report_waits_while_destination_is_down_then_arrives(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    server = start_server(pacs.config(tmp_path, retry_initial_s=0.2, retry_max_s=0.5))
    ds, _ = synthetic_cxr(11)
    assert storescu(server.scp.port, [save(ds, tmp_path / "in.dcm")]).returncode == 0
    # Nothing listens at the PACS: the report stays queued and is retried.
    item = wait_until(
        lambda: [i for i in server.state.outbox("queued") if i.attempts >= 3],
        60,
        "three failed delivery attempts",
    )[0]
    assert "not accepted" in item.last_error or "refused" in item.last_error.lower()
    assert server.state.study(ds.StudyInstanceUID)[0] == "reported"  # type: ignore[index]
    pacs.start()
    report = pydicom.dcmread(pacs.wait_reports()[0])
    assert report.StudyInstanceUID == ds.StudyInstanceUID
    assert report.SOPInstanceUID == item.sop_instance_uid
    wait_state(server, ds.StudyInstanceUID, "delivered")


def test_study_on_one_association_is_analysed_on_release(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    pacs.start()
    server = start_server(pacs.config(tmp_path, idle_timeout_s=600))
    study = generate_uid()
    a, _ = synthetic_cxr(1, study_uid=study)
    b, _ = synthetic_cxr(2, nodule=True, study_uid=study, rows=800, columns=1000)
    files = [save(a, tmp_path / "a.dcm"), save(b, tmp_path / "b.dcm")]
    assert storescu(server.scp.port, files).returncode == 0
    # The idle timeout is 10 minutes: only the association's release can complete it.
    sr = pydicom.dcmread(pacs.wait_reports()[0])
    assert evidence(sr) == {a.SOPInstanceUID, b.SOPInstanceUID}  # one report for the whole study


def test_queued_report_is_delivered_after_a_restart(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = pacs.config(tmp_path)
    first = start_server(cfg)
    ds, _ = synthetic_cxr(12)
    assert storescu(first.scp.port, [save(ds, tmp_path / "in.dcm")]).returncode == 0
    wait_until(lambda: first.state.outbox("queued"), 60, "the report to be queued")
    first.stop()  # the PACS was down all along: the report is only in the outbox
    pacs.start()
    second = start_server(cfg)
    assert pydicom.dcmread(pacs.wait_reports()[0]).StudyInstanceUID == ds.StudyInstanceUID
    wait_state(second, ds.StudyInstanceUID, "delivered")


def test_dead_letter_is_visible_and_resent_from_the_cli(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = pacs.config(tmp_path, retry_initial_s=0.1, retry_max_s=0.1)
    cfg.reports.max_attempts = 2
    server = start_server(cfg)
    ds, _ = synthetic_cxr(13)
    assert storescu(server.scp.port, [save(ds, tmp_path / "in.dcm")]).returncode == 0
    (dead,) = wait_until(lambda: server.state.outbox("dead"), 60, "a dead letter")
    assert dead.attempts == 2 and dead.last_error
    assert server.state.outbox("queued") == []  # no longer retried by itself
    conf = tmp_path / "c.toml"
    conf.write_text(f'[storage]\ndata_dir = "{cfg.storage.data_dir}"\n')
    nidaan = [str(NIDAAN), "--config", str(conf), "outbox"]
    listing = subprocess.run([*nidaan, "--state", "dead"], capture_output=True, text=True)
    assert listing.returncode == 0 and "dead" in listing.stdout and "PACS" in listing.stdout
    assert ds.StudyInstanceUID not in listing.stdout  # digests, not UIDs
    pacs.start()
    resend = subprocess.run([*nidaan, "--resend"], capture_output=True, text=True)
    assert "1 dead letter(s) queued again" in resend.stdout, resend.stderr
    assert pydicom.dcmread(pacs.wait_reports()[0]).StudyInstanceUID == ds.StudyInstanceUID
    wait_state(server, ds.StudyInstanceUID, "delivered")


def test_audit_log_says_who_sent_what_and_where_reports_went(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    pacs.start()
    cfg = pacs.config(tmp_path)
    server = start_server(cfg)
    ds, _ = synthetic_cxr(14)
    assert storescu(server.scp.port, [save(ds, tmp_path / "in.dcm")]).returncode == 0
    pacs.wait_reports()
    wait_state(server, ds.StudyInstanceUID, "delivered")
    events = [json.loads(line) for line in (cfg.storage.data_dir / "audit.jsonl").open()]
    received = [e for e in events if e["event"] == "instance"]
    assert received and received[0]["calling_ae"] == "MODALITY"
    assert received[0]["host"] == "127.0.0.1" and received[0]["status"] == "0x0000"
    assert received[0]["study"] == ds.StudyInstanceUID
    assert received[0]["sop_instance"] == ds.SOPInstanceUID
    sent = [e for e in events if e["event"] == "report_delivery" and e["ok"]]
    assert sent and sent[0]["destination"] == "PACS" and sent[0]["study"] == ds.StudyInstanceUID
    text = (cfg.storage.data_dir / "audit.jsonl").read_text()
    assert str(ds.PatientName) not in text and str(ds.PatientID) not in text


def test_routing_rules_choose_models_and_destinations(
    tmp_path: Path,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    from nidaan.core.config import Route

    ward = Pacs(free_port(), tmp_path / "archive")
    radiology = Pacs(free_port(), tmp_path / "pacs")
    ward.start()
    radiology.start()
    try:
        cfg = make_config(
            tmp_path,
            peers=[
                Peer("PACS", "127.0.0.1", radiology.port),
                Peer("ARCHIVE", "127.0.0.1", ward.port),
            ],
        )
        cfg.routes = [
            Route(name="ward", calling_ae=["WARD"], destinations=["ARCHIVE"]),
            Route(
                name="radiology",
                modality=["CR", "DX"],
                series_description=r"\bPA\b",
                models=["cxr_screen"],
                destinations=["PACS"],
            ),
        ]
        cfg.validate()
        server = start_server(cfg)
        sent = {}
        for name, calling, description in (
            ("ward", "WARD", "lateral"),
            ("radiology", "MODALITY", "CHEST PA"),
            ("unrouted", "MODALITY", "CHEST LATERAL"),
        ):
            ds, _ = synthetic_cxr(70 + len(sent))
            ds.SeriesDescription = description
            run = storescu(server.scp.port, [save(ds, tmp_path / f"{name}.dcm")], calling=calling)
            assert run.returncode == 0, run.stderr
            sent[name] = ds.StudyInstanceUID
        wait_state(server, sent["ward"], "delivered")
        wait_state(server, sent["radiology"], "delivered")
        wait_state(server, sent["unrouted"], "skipped")
        at_archive = {pydicom.dcmread(f).StudyInstanceUID for f in ward.wait_reports()}
        at_pacs = {pydicom.dcmread(f).StudyInstanceUID for f in radiology.wait_reports()}
        assert at_archive == {sent["ward"]} and at_pacs == {sent["radiology"]}
    finally:
        ward.stop()
        radiology.stop()


def test_routes_naming_unknown_models_or_bad_patterns_are_refused(tmp_path: Path) -> None:
    from nidaan.core.config import Route
    from nidaan.core.errors import ConfigError
    from nidaan.server.app import NidaanServer

    cfg = make_config(tmp_path)
    cfg.routes = [Route(name="ct", models=["no_such_model"])]
    with pytest.raises(ConfigError, match="unknown model"):
        NidaanServer(cfg)
    cfg.routes = [Route(name="bad", series_description="(unclosed")]
    with pytest.raises(ConfigError, match="not a valid regex"):
        cfg.validate()


def test_storescu_with_several_transfer_syntaxes_in_one_study(
    tmp_path: Path,
    pacs: Pacs,
    start_server,  # type: ignore[no-untyped-def]
) -> None:
    pacs.start()
    server = start_server(pacs.config(tmp_path))
    study = generate_uid()
    files = []
    # name: (tool that makes the file, storescu's option to propose its syntax first)
    tools: dict[str, tuple[tuple[str, ...] | None, str]] = {
        "explicit-le": (None, "-xe"),
        "implicit-le": (("dcmconv", "+ti"), "-xi"),
        "big-endian": (("dcmconv", "+tb"), "-xb"),
        "jpeg-lossless": (("dcmcjpeg", "+e1"), "-xs"),
        "rle": (("dcmcrle",), ""),  # storescu cannot propose RLE: pynetdicom sends this one
    }
    options = []
    for i, (name, (tool, option)) in enumerate(tools.items()):
        options.append(option)
        ds, _ = synthetic_cxr(80 + i, study_uid=study, rows=512, columns=480)
        src = save(ds, tmp_path / f"{name}-src.dcm")
        if tool is None:
            files.append(src)
            continue
        dst = tmp_path / f"{name}.dcm"
        run = subprocess.run([need(tool[0]), *tool[1:], str(src), str(dst)], capture_output=True)
        assert run.returncode == 0, run.stderr
        files.append(dst)
    j2k = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    j2k.StudyInstanceUID = study
    j2k.SOPInstanceUID = j2k.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    files.append(save(j2k, tmp_path / "j2k.dcm"))
    options.append("-xv")
    syntaxes = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files
    }
    assert len(syntaxes) == 6
    for f, option in zip(files, options, strict=True):  # each in its own transfer syntax
        if not option:
            (status,) = c_store(server.scp.port, [pydicom.dcmread(f)])
            assert status.Status == 0x0000
            continue
        run = storescu(server.scp.port, [f], extra=(option,))
        assert run.returncode == 0, run.stderr
        assert "Converting transfer syntax" not in run.stdout + run.stderr
    # Six associations: the first release completes the study, later ones reopen it, and once
    # idle it is analysed again: the last report covers every instance.

    full = wait_until(
        lambda: [f for f in pacs.reports() if len(evidence(pydicom.dcmread(f))) == 6],
        60,
        "a report covering all six encodings",
    )
    assert len(full) == 1  # every encoding decoded and analysed into one report
