"""Crash safety: a `kill -9` of `nidaan serve` after it acknowledged studies loses none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from conftest import MODELS
from factory import save, synthetic_cxr
from netutil import storescu
from peers import DCMTK_ENV, free_port, need, stop, wait_for_port, wait_until


def _serve(config: Path, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "nidaan"
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [str(exe), "--config", str(config), "serve", "--no-http"],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def test_every_acknowledged_study_is_reported_after_kill_9(tmp_path: Path) -> None:
    nidaan_port, pacs_port = free_port(), free_port()
    config = tmp_path / "nidaan.toml"
    config.write_text(
        f'[dicom]\nbind = "127.0.0.1"\nport = {nidaan_port}\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[models]\nrepository = "{MODELS}"\n'
        '[reports]\ndestinations = ["PACS"]\nretry_initial_s = 0.2\nretry_max_s = 0.5\n'
        f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    )
    log = tmp_path / "nidaan.log"
    server = _serve(config, log)
    pacs = None
    try:
        wait_for_port(nidaan_port, timeout=120, proc=server)
        sent = []
        for i in range(6):
            ds, _ = synthetic_cxr(600 + i, nodule=i % 2 == 0, rows=700, columns=600)
            run = storescu(nidaan_port, [save(ds, tmp_path / f"{i}.dcm")])
            assert run.returncode == 0, run.stderr  # acknowledged: Nidaan now owes a report
            sent.append(ds.StudyInstanceUID)
        # The PACS is down, studies are somewhere between received and queued: crash now.
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        pacs_dir = tmp_path / "pacs"
        pacs_dir.mkdir()
        pacs = subprocess.Popen(
            [need("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(pacs_port, proc=pacs)
        server = _serve(config, log)
        wait_for_port(nidaan_port, timeout=120, proc=server)
        reports = wait_until(
            lambda: f if len(f := list(pacs_dir.glob("SR*"))) >= len(sent) else None,
            120,
            "a report for every acknowledged study",
        )
        time.sleep(1.0)  # a duplicate would arrive as an extra file with the same UID or a new one
        studies = sorted(
            pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
            for f in pacs_dir.glob("SR*")
        )
        assert studies == sorted(sent), "each study reported exactly once"
        assert len(reports) == len(sent)
    finally:
        stop(server)
        if pacs is not None:
            stop(pacs)


def test_kill_9_in_the_middle_of_an_association_keeps_every_acknowledged_instance(
    tmp_path: Path,
) -> None:
    nidaan_port, pacs_port = free_port(), free_port()
    config = tmp_path / "nidaan.toml"
    config.write_text(
        f'[dicom]\nbind = "127.0.0.1"\nport = {nidaan_port}\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[models]\nrepository = "{MODELS}"\n'
        '[reports]\ndestinations = ["PACS"]\n'
        f'[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    )
    from pydicom.uid import generate_uid

    study = generate_uid()
    files, uids = [], {}
    for i in range(60):
        ds, _ = synthetic_cxr(700 + i, study_uid=study, rows=400, columns=350)
        files.append(save(ds, tmp_path / f"{i:02d}.dcm"))
        uids[str(files[-1])] = ds.SOPInstanceUID
    log = tmp_path / "nidaan.log"
    server = _serve(config, log)
    pacs = None
    try:
        wait_for_port(nidaan_port, timeout=120, proc=server)
        sender = subprocess.Popen(
            [
                need("storescu"),
                "-v",
                "-aec",
                "NIDAAN",
                "127.0.0.1",
                str(nidaan_port),
                *map(str, files),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        audit = tmp_path / "data" / "audit.jsonl"
        wait_until(
            lambda: audit.exists() and audit.read_text().count('"0x0000"') >= 10,
            60,
            "ten acknowledged instances",
            interval=0.01,
        )
        os.kill(server.pid, signal.SIGKILL)  # mid-association, mid-study
        server.wait()
        out, _ = sender.communicate(timeout=60)
        acknowledged, current = set(), None
        for line in out.splitlines():
            if "Sending file:" in line:
                current = line.split("Sending file:")[1].strip()
            elif "Received Store Response (Success)" in line and current:
                acknowledged.add(uids[current])
        assert 10 <= len(acknowledged) < len(files), "the kill should land mid-association"
        pacs_dir = tmp_path / "pacs"
        pacs_dir.mkdir()
        pacs = subprocess.Popen(
            [need("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(pacs_port, proc=pacs)
        server = _serve(config, log)
        wait_for_port(nidaan_port, timeout=120, proc=server)

        def reported() -> set[str]:
            seen: set[str] = set()
            for f in pacs_dir.glob("SR*"):
                sr = pydicom.dcmread(f)
                seen |= {
                    i.ReferencedSOPInstanceUID
                    for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for se in s.ReferencedSeriesSequence
                    for i in se.ReferencedSOPSequence
                }
            return seen

        wait_until(
            lambda: acknowledged <= reported(),
            120,
            "every acknowledged instance in a delivered report",
        )
    finally:
        stop(server)
        if pacs is not None:
            stop(pacs)
