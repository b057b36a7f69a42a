"""What a crash or a vanished sender leaves behind: no patient data outside the data dir, at any
moment, and nothing half-written that a restart does not sweep."""

from __future__ import annotations

import contextlib
import copy
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_recovery import _kill_9, _setup

from factory import save, synthetic_cxr
from netutil import storescu
from peers import DCMTK_ENV, need, start_nidaan, stop, wait_for_port, wait_until

#: The test patient: findable byte for byte in any file holding one of the study's instances.
PATIENT_NAME = "Residue^Tessa^Crash"
PATIENT_ID = "RESIDUE-4711"


def _study(folder: Path, count: int, *, rows: int, columns: int) -> tuple[list[Path], dict]:
    """``count`` large instances of one study of the test patient; also file -> SOP UID."""
    template, _ = synthetic_cxr(900, rows=rows, columns=columns, study_uid=generate_uid())
    template.PatientName, template.PatientID = PATIENT_NAME, PATIENT_ID
    files, uids = [], {}
    for i in range(count):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        files.append(save(ds, folder / f"{i:03d}.dcm"))
        uids[str(files[-1])] = ds.SOPInstanceUID
    return files, uids


def _holding_patient(folder: Path, head: int | None = None) -> list[Path]:
    """Files under ``folder`` that hold the test patient's name (in their first ``head`` bytes:
    it comes early, with the rest of the header)."""
    found = []
    for path in folder.rglob("*"):
        try:
            with open(path, "rb") as fh:
                if PATIENT_NAME.encode() in fh.read(head if head is not None else -1):
                    found.append(path)
        except (IsADirectoryError, FileNotFoundError):  # a folder, or deleted while we looked
            continue
    return found


class _Cutoff:
    """A TCP relay to the server that passes on a sender's first ``limit`` bytes and holds the
    rest back; :meth:`cut` then drops both connections, as a sender's host vanishing would."""

    def __init__(self, target_port: int, limit: int) -> None:
        self.target_port, self.limit = target_port, limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        sender, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        self.sockets += [sender, server]
        threading.Thread(target=self._pipe, args=(server, sender, None), daemon=True).start()
        self._pipe(sender, server, self.limit)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while limit is None or passed < limit:
                data = src.recv(65536 if limit is None else min(65536, limit - passed))
                if not data:
                    return
                dst.sendall(data)
                passed += len(data)
        except OSError:
            return

    def cut(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.listener.close()


def test_kill_9_mid_instance_leaves_no_patient_data_outside_the_data_dir_and_no_residue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, port, pacs = _setup(tmp_path)
    data = tmp_path / "data"
    # The server's system temp dir: a fresh folder, so everything in it was made by this test.
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    # Large instances, so that receiving and fsync'ing one takes long enough for the kill to
    # land in the middle of it. (The spool takes a staged instance by a hard link renamed into
    # place, so its temporary name lives for microseconds: partial writes are the subject of
    # test_a_crash_s_partial_writes_are_swept_at_start.)
    files, uids = _study(tmp_path / "study", 20, rows=2400, columns=2400)  # 11.5 MB each
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
        audit = data / "audit.jsonl"
        # Four audited Successes: the audit line is written before the answer goes out, so the
        # fourth proves only that storescu had the third answer (it sends one instance at a
        # time), which is what "at least three acknowledged" below needs. Waiting for three
        # let the kill land between the third audit line and its answer (seen in CI).
        wait_until(
            lambda: audit.exists() and audit.read_text().count('"0x0000"') >= 4,
            120,
            "four audited instances",
            interval=0.01,
        )

        def mid_instance() -> bool:
            # An instance is being staged (or fsync'd): look wherever the staged copy may be.
            return bool(
                _holding_patient(data / "tmp", 1 << 16) or _holding_patient(system_tmp, 1 << 16)
            )

        wait_until(mid_instance, 120, "an instance being written to the spool", interval=0.002)
        _kill_9(server)
        out, _ = sender.communicate(timeout=60)

        leaked = _holding_patient(system_tmp)
        assert leaked == [], f"patient data left in the system temp dir: {leaked}"
        assert _holding_patient(data / "tmp"), "the kill should land while an instance is staged"

        acknowledged, current = set(), None
        for line in out.splitlines():
            if "Sending file:" in line:
                current = line.split("Sending file:")[1].strip()
            elif "Received Store Response (Success)" in line and current:
                acknowledged.add(uids[current])
        assert 3 <= len(acknowledged) < len(files), "the kill should land mid-association"

        server = start_nidaan(config, log)
        wait_for_port(port, timeout=120, proc=server)
        assert list(data.rglob(".*.tmp")) == [], "a partial write survived the restart"
        assert [p for p in (data / "tmp").iterdir()] == [], "a staged data set survived"
        assert _holding_patient(system_tmp) == []
        (study_dir,) = (data / "spool").iterdir()
        stored = {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for p in study_dir.glob("*.dcm")
        }
        assert acknowledged <= stored, "an acknowledged instance is missing"
        text = log.read_text()
        assert "removed what an interrupted run left: 1 staged data set(s)" in text
        assert PATIENT_NAME not in text and PATIENT_ID not in text
    finally:
        stop(server)
        pacs.stop()
        shutil.rmtree(tmp_path / "study")  # a quarter of a gigabyte


def test_a_crash_s_partial_writes_are_swept_at_start(tmp_path: Path) -> None:
    """What a crash leaves mid-write (atomic_write's temporary files in the spool, quarantine
    and reports folders, and staged data sets) is removed by the next start's sweep, and
    nothing else is."""
    from nidaan.pacs_bridge.spool import Spool, atomic_write

    spool = Spool(tmp_path / "data")
    kept = spool.store("1.2.3", "1.2.3.4", [b"whole"])
    report = spool.reports_dir / "1.2.3.5.dcm"
    atomic_write(report, [b"report"])
    leftovers = [
        kept.with_name(f".{kept.name}.999.1.tmp"),
        spool.quarantine_dir / ".20261201T000000-1.dcm.999.2.tmp",
        spool.reports_dir / ".1.2.3.6.dcm.999.3.tmp",
        spool.staging_dir / "tmpabcd.dcm",
    ]
    for p in leftovers:
        p.write_bytes(b"PATIENT^NAME half written")
    swept = spool.sweep()
    assert (swept.staged, swept.partial_writes) == (1, 3)
    assert not any(p.exists() for p in leftovers)
    assert kept.read_bytes() == b"whole" and report.read_bytes() == b"report"
    spool.close()


def test_a_sender_that_vanishes_mid_instance_leaves_nothing_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, port, pacs = _setup(tmp_path)
    data = tmp_path / "data"
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    files, _ = _study(tmp_path / "study", 1, rows=1024, columns=1024)  # 2 MB
    server = start_nidaan(config, tmp_path / "nidaan.log")
    relay = _Cutoff(port, limit=1 << 20)  # the instance's first megabyte arrives, no more
    try:
        wait_for_port(port, timeout=120, proc=server)
        sender = subprocess.Popen(
            [need("storescu"), "-aec", "NIDAAN", "127.0.0.1", str(relay.port), str(files[0])],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        staged = wait_until(
            lambda: _holding_patient(data / "tmp", 1 << 16) or _holding_patient(system_tmp),
            60,
            "the instance being received",
            interval=0.01,
        )
        assert [p.parent for p in staged] == [data / "tmp"], "staged outside the data dir"
        relay.cut()
        sender.kill()
        sender.wait()
        wait_until(
            lambda: not any((data / "tmp").iterdir()),
            30,
            "the half-received data set to be removed",
        )
        assert list((data / "spool").iterdir()) == []  # never acknowledged, never stored
        run = storescu(port, files)  # and it goes on receiving
        assert run.returncode == 0, run.stderr
        assert len(list((data / "spool").rglob("*.dcm"))) == 1
    finally:
        relay.cut()
        stop(server)
        pacs.stop()
