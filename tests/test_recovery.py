"""Crash safety: a `kill -9` of `nidaan serve` loses no study it acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from conftest import MODELS
from factory import save, synthetic_cxr
from netutil import storescu
from peers import (
    DCMTK_ENV,
    StoreSCP,
    free_port,
    need,
    nidaan_config,
    start_nidaan,
    stop,
    wait_for_port,
    wait_until,
)
from srutil import evidence


def _setup(tmp_path: Path) -> tuple[Path, int, StoreSCP]:
    """A config for nidaan on a free port whose reports go to a (not yet started) PACS."""
    port = free_port()
    pacs = StoreSCP(free_port(), tmp_path / "pacs")
    config = nidaan_config(
        tmp_path / "nidaan.toml",
        port=port,
        data_dir=tmp_path / "data",
        models=MODELS,
        extra='[reports]\ndestinations = ["PACS"]\nretry_initial_s = 0.2\nretry_max_s = 0.5\n',
        peers={"PACS": pacs.port},
    )
    return config, port, pacs


def _kill_9(server: subprocess.Popen) -> None:
    os.kill(server.pid, signal.SIGKILL)
    server.wait()


def test_every_acknowledged_study_is_reported_after_kill_9(tmp_path: Path) -> None:
    config, port, pacs = _setup(tmp_path)
    log = tmp_path / "nidaan.log"
    server = start_nidaan(config, log)
    try:
        wait_for_port(port, timeout=120, proc=server)
        sent = []
        for i in range(6):
            ds, _ = synthetic_cxr(600 + i, nodule=i % 2 == 0, rows=700, columns=600)
            run = storescu(port, [save(ds, tmp_path / f"{i}.dcm")])
            assert run.returncode == 0, run.stderr  # acknowledged: Nidaan now owes a report
            sent.append(ds.StudyInstanceUID)
        # The PACS is down, studies are somewhere between received and queued: crash now.
        _kill_9(server)
        pacs.start()
        server = start_nidaan(config, log)
        wait_for_port(port, timeout=120, proc=server)
        reports = pacs.wait_reports(len(sent), timeout=120)
        studies = sorted(
            pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in reports
        )
        assert studies == sorted(sent), "each study reported exactly once"
    finally:
        stop(server)
        pacs.stop()


def test_kill_9_in_the_middle_of_an_association_keeps_every_acknowledged_instance(
    tmp_path: Path,
) -> None:
    config, port, pacs = _setup(tmp_path)
    study = generate_uid()
    files, uids = [], {}
    # Enough instances that the kill lands mid-association even on a loaded machine.
    for i in range(150):
        ds, _ = synthetic_cxr(700 + i, study_uid=study, rows=400, columns=350)
        files.append(save(ds, tmp_path / f"{i:03d}.dcm"))
        uids[str(files[-1])] = ds.SOPInstanceUID
    log = tmp_path / "nidaan.log"
    server = start_nidaan(config, log)
    try:
        wait_for_port(port, timeout=120, proc=server)
        sender = subprocess.Popen(
            [need("storescu"), "-v", "-aec", "NIDAAN", "127.0.0.1", str(port), *map(str, files)],
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
        _kill_9(server)  # mid-association, mid-study
        out, _ = sender.communicate(timeout=60)
        acknowledged, current = set(), None
        for line in out.splitlines():
            if "Sending file:" in line:
                current = line.split("Sending file:")[1].strip()
            elif "Received Store Response (Success)" in line and current:
                acknowledged.add(uids[current])
        # The audit line is written before the response is sent, so the sender may have seen one
        # acknowledgement fewer than the audit counted when the kill landed.
        assert 5 <= len(acknowledged) < len(files), "the kill should land mid-association"
        pacs.start()
        server = start_nidaan(config, log)
        wait_for_port(port, timeout=120, proc=server)

        def reported() -> set[str]:
            return set().union(*(evidence(pydicom.dcmread(f)) for f in pacs.reports()))

        wait_until(
            lambda: acknowledged <= reported(),
            120,
            "every acknowledged instance in a delivered report",
        )
    finally:
        stop(server)
        pacs.stop()
