"""A study's result objects built in worker processes (server.result_objects): the same objects
as built in process, and a builder that dies or overruns costs a retry or that study's report,
never the server."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from nidaan.core.errors import ReportError
from nidaan.core.findings import (
    AlgorithmInfo,
    CodedValue,
    Finding,
    ImageAnalysis,
    Outline,
)
from nidaan.pacs_bridge.lesions import group_findings
from nidaan.pacs_bridge.reports import report_key, study_attributes
from nidaan.server.result_objects import (
    ObjectOrder,
    ResultBuilder,
    build,
    encoded_report,
    slot,
)

from factory import save, synthetic_ct_series, synthetic_cxr

pytestmark = pytest.mark.peers  # starts worker processes

SYNTHETIC = AlgorithmInfo(
    "Demo CXR screen", "0.1.0", "Nidaan project", trained_on_synthetic_data=True, model="cxr_screen"
)
NODULE = CodedValue("786838002", "SCT", "Pulmonary nodule")
TRIANGLE = Outline(((40.5, 50.5), (90.5, 50.5), (90.5, 100.5), (40.5, 50.5)), 0.9)


def _order(tmp_path: Path, slots: tuple[tuple[str, str], ...]) -> ObjectOrder:
    """An order for a radiograph with one nodule, its file in ``tmp_path``."""
    cxr, _ = synthetic_cxr(4, rows=400, columns=300)
    path = save(cxr, tmp_path / "cxr.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    analysis = ImageAnalysis(
        SYNTHETIC, header, (Finding("nodule", NODULE, 0.9, 0.38, outlines=(TRIANGLE,)),)
    )
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    uid = str(header.SOPInstanceUID)
    return ObjectOrder(
        study_uid=str(header.StudyInstanceUID),
        analyses=[analysis],
        findings=group_findings([analysis]),
        key=report_key([analysis], [uid]),
        sources={uid: path},
        study_attributes=study_attributes([header]),
        reports_dir=reports,
        device_uid="2.25.99",
        series_number=9901,
        institution_name="",
        slots=slots,
    )


SLOTS = (slot("sr", "hi"), slot("seg", "hi"), slot("gsps", ""), slot("sc", ""))


@pytest.fixture(scope="module")
def builder():  # type: ignore[no-untyped-def]
    b = ResultBuilder(workers=2)
    b.start()
    yield b
    b.close()


def test_objects_built_in_a_worker_are_those_built_in_process(
    tmp_path: Path, builder: ResultBuilder
) -> None:
    order = _order(tmp_path, SLOTS)
    (tmp_path / "local").mkdir()
    local = build(dataclasses.replace(order, reports_dir=tmp_path / "local"))
    remote = builder.build(order)
    # The English SR first, always; then one object of each slot asked for.
    assert list(remote.objects) == [("sr", ""), ("sr", "hi"), ("seg", ""), ("gsps", ""), ("sc", "")]
    assert remote.problems == {} and local.problems == {}
    for s, made in remote.objects.items():
        ((path, uid),), ((local_path, local_uid),) = made, local.objects[s]
        assert uid == local_uid, s  # UIDs derive from the study and the report key
        assert path == order.reports_dir / f"{uid}.dcm"
        ds, expected = pydicom.dcmread(path), pydicom.dcmread(local_path)
        assert ds.SOPClassUID == expected.SOPClassUID
        assert ds.StudyInstanceUID == order.study_uid
        if s[0] == "sr":
            assert ds.ContentSequence == expected.ContentSequence
        elif s[0] == "gsps":
            assert ds.GraphicAnnotationSequence == expected.GraphicAnnotationSequence
        else:
            assert ds.pixel_array.any()
            np.testing.assert_array_equal(ds.pixel_array, expected.pixel_array)


def test_a_region_object_that_cannot_be_made_is_named_and_the_sr_still_comes(
    tmp_path: Path, builder: ResultBuilder
) -> None:
    order = _order(tmp_path, (slot("sr", ""), slot("seg", "")))
    for path in order.sources.values():
        path.unlink()  # e.g. swept by retention between analysis and the build
    built = builder.build(order)
    assert len(built.objects[("sr", "")]) == 1 and built.objects[("seg", "")] == []
    assert built.problems == {"seg": built.problems["seg"]}
    assert built.problems["seg"].startswith("no SEG: FileNotFoundError")
    assert order.study_uid not in built.problems["seg"]  # UIDs stay out of the reason


def test_a_builder_killed_mid_study_costs_a_retry_not_the_report(
    tmp_path: Path, builder: ResultBuilder
) -> None:
    # A 60-slice CT with a lesion on every slice keeps a builder busy long enough to kill it.
    slices, _ = synthetic_ct_series(5, slices=60, size=256)
    paths = {str(s.SOPInstanceUID): save(s, tmp_path / f"{i}.dcm") for i, s in enumerate(slices)}
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths.values()]
    analyses = [
        ImageAnalysis(SYNTHETIC, h, (Finding("nodule", NODULE, 0.9, 0.38, outlines=(TRIANGLE,)),))
        for h in headers
    ]
    (tmp_path / "reports").mkdir()
    order = ObjectOrder(
        study_uid=str(headers[0].StudyInstanceUID),
        analyses=analyses,
        findings=group_findings(analyses),
        key=report_key(analyses, paths),
        sources=paths,
        study_attributes=study_attributes(headers),
        reports_dir=tmp_path / "reports",
        device_uid="2.25.99",
        series_number=9901,
        institution_name="",
        slots=(slot("sr", ""), slot("seg", ""), slot("gsps", "")),
    )
    pool = builder._pool
    assert pool is not None
    workers = [p.pid for p in pool._executor()._processes.values()]  # type: ignore[union-attr]
    restarts = builder.restarts
    results = []

    def kill_them() -> None:
        time.sleep(0.3)  # the build is under way (seconds of SR and SEG)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_them)
    killer.start()
    results.append(builder.build(order))
    killer.join()
    assert builder.restarts == restarts + 1  # the broken pool was replaced
    (built,) = results
    assert len(built.objects[("sr", "")]) == 1 and built.objects[("seg", "")]  # and all made
    now = [p.pid for p in pool._executor()._processes.values()]  # type: ignore[union-attr]
    assert not set(workers) & set(now)


def test_a_study_past_the_time_limit_fails_with_a_reason_and_the_next_is_built(
    tmp_path: Path,
) -> None:
    slow = ResultBuilder(workers=1, timeout_s=0.01)  # any SR takes longer
    try:
        slow.start()
        with pytest.raises(ReportError, match="result objects took longer than 0.01 s"):
            slow.build(_order(tmp_path, (slot("sr", ""),)))
        assert slow.restarts == 1
        assert slow._pool is not None
        slow._pool.timeout_s = 60
        (tmp_path / "next").mkdir()
        built = slow.build(_order(tmp_path / "next", (slot("sr", ""),)))
        assert built.objects[("sr", "")][0][0].is_file()
    finally:
        slow.close()


def test_a_grpc_requests_report_built_in_a_worker_and_its_refusal_named(
    tmp_path: Path, builder: ResultBuilder
) -> None:
    order = _order(tmp_path, ())
    uids = {
        "series_instance_uid": "2.25.1001",
        "sop_instance_uid": "2.25.1002",
        "series_number": 9901,
        "device_uid": "2.25.99",
    }
    remote = pydicom.dcmread(io.BytesIO(builder.report(order.analyses, **uids)))
    local = pydicom.dcmread(io.BytesIO(encoded_report(order.analyses, *uids.values())))
    assert remote.SOPInstanceUID == "2.25.1002" and remote.ContentSequence == local.ContentSequence
    # What the builder refuses comes back as the ValueError naming why (gRPC INVALID_ARGUMENT).
    other = copy.deepcopy(order.analyses[0])
    other.source.PatientID = "SOMEONE-ELSE"
    other.source.SOPInstanceUID = "2.25.1003"
    with pytest.raises(ValueError, match="disagree on PatientID"):
        builder.report([order.analyses[0], other], **uids)
