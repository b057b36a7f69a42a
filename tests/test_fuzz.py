"""Fuzzing the ingest path (bounded): mutated data sets over real associations never crash the
server; each one, a new instance, is either answered Success and stored as sent and recorded, or
refused and quarantined with its reason; and the server goes on serving."""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from nidaan.server.app import NidaanServer

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store, send_raw
from peers import wait_until

CR = "1.2.840.10008.5.1.4.1.1.1"


@dataclass
class Target:
    """The server under fuzz and the instance whose mutations it is sent."""

    server: NidaanServer
    ds: Dataset

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "<the fuzzed server>"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    server = NidaanServer(make_config(tmp_path_factory.mktemp("fuzz")))
    server.start(http=False)
    ds, _ = synthetic_cxr(51, rows=64, columns=64)
    yield Target(server, ds)
    server.stop()


def _data_set(ds: Dataset, sop_uid: str) -> bytes:
    """The data set bytes (no preamble, no file meta) of ``ds`` as instance ``sop_uid``."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    return raw[144 + struct.unpack("<I", raw[140:144])[0] :]


@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6
    ),
    cut=st.integers(0, 10_000),
)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    # Random mutations on developers' machines; the same fixed ones in CI, so a CI run is
    # reproducible (a crash found locally is kept in hypothesis's example database).
    derandomize=os.environ.get("CI", "").lower() == "true",
)
def test_mutated_instances_never_break_the_server(target: Target, edits, cut) -> None:  # type: ignore[no-untyped-def]
    server, ds = target.server, target.ds
    # A new instance each example: with one UID for all, Success after the first would prove
    # nothing (the first stored copy satisfies "stored and recorded" for every later one).
    sop_uid = generate_uid()
    data = bytearray(_data_set(ds, sop_uid))
    for at, patch in edits:
        at %= len(data)
        data[at : at + len(patch)] = patch
    data = data[: max(1, len(data) - cut % 64)]
    quarantine = server.spool.quarantine_dir
    before = set(quarantine.glob("*.json"))
    status = send_raw(server.scp.port, bytes(data), CR, sop_uid)
    assert status is not None, "no C-STORE response"
    # Only what admission refused: an earlier example's study, analysed meanwhile, may add an
    # entry of its own (stage "analysis") for an image that decoded badly after its Success.
    quarantined = sorted(
        p
        for p in set(quarantine.glob("*.json")) - before
        if json.loads(p.read_text())["stage"] == "admission"
    )
    study = server.state.study_of(sop_uid)
    event("stored" if status.Status == 0x0000 else f"refused 0x{status.Status:04X}")
    if status.Status == 0x0000:
        # Success means this very instance was stored, as sent, and recorded.
        assert study is not None, "Success, but the instance is not recorded"
        (record,) = [r for r in server.state.instances(study) if r.sop_instance_uid == sop_uid]
        assert record.path.resolve() == server.spool.instance_path(study, sop_uid).resolve()
        assert record.path.read_bytes().endswith(bytes(data)), "stored bytes are not those sent"
        assert quarantined == [], "a stored instance was also quarantined"
    else:
        assert status.Status >> 12 in (0xA, 0xB, 0xC), hex(status.Status)
        assert study is None, "refused, yet recorded"
        # Refused means kept in quarantine, with its reason and the status it was refused with.
        assert len(quarantined) == 1, f"{len(quarantined)} quarantine entries for one refusal"
        info = json.loads(quarantined[0].read_text())
        assert info["reason"] and info["status"] == f"0x{status.Status:04X}", info
        # The reason's first 64 characters (LO), less a space the cut may leave at the end.
        assert str(status.get("ErrorComment", "")) == info["reason"][:64].rstrip()
        kept = quarantined[0].with_suffix(".dcm")
        assert kept.read_bytes().endswith(bytes(data)), "the quarantined file is not the one sent"


def test_server_still_serves_after_fuzzing(target: Target) -> None:
    server = target.server
    ds, _ = synthetic_cxr(52, rows=64, columns=64)
    (status,) = c_store(server.scp.port, [ds])
    assert status.Status == 0x0000
    # Every acknowledged instance ends in a report or a visible failure: no study of the
    # fuzzing is left receiving, complete or half analysed, and each failure says why.
    unfinished = ("receiving", "complete", "analysed")
    wait_until(
        lambda: not any(server.state.counts().get(s) for s in unfinished),
        60,
        "every fuzzed study to reach a final state",
    )
    counts = server.state.counts()
    assert set(counts) <= {"reported", "delivered", "skipped", "failed"}, counts
    for study in server.state.studies_in("failed"):
        assert server.state.study(study)[1], "a failed study without its reason"
