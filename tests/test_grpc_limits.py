"""The gRPC API's limits, tested on real servers: a taken port, the concurrency limit (every call
counted and audited, refused ones too), and what a refused instance may cost the disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from test_grpc_api import _bytes, _repository_with_delay

from nidaan.client import Client
from nidaan.core.config import Config
from nidaan.core.errors import InputError, NidaanError
from nidaan.server.app import NidaanServer

from conftest import MODELS, make_config
from factory import synthetic_cxr
from netutil import send_raw
from peers import (
    NIDAAN,
    free_port,
    nidaan_config,
    start_nidaan,
    stop,
    wait_for_port,
    wait_until,
)

#: Garbage an integrator might send: not DICOM, and no patient data in it.
GARBAGE = b"not DICOM at all " * 64


def _serve(config: Config, *, http: bool = False) -> NidaanServer:
    server = NidaanServer(config)
    server.start(http=http)
    assert server.api is not None
    return server


def _grpc_counts(http_port: int) -> Counter[str]:
    """``nidaan_grpc_requests_total`` by code, read from the server's /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("nidaan_grpc_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            code = labels.split('code="')[1].split('"')[0]
            counts[code] += int(float(value))
    return counts


def _audited(config: Config) -> list[dict]:
    audit = config.storage.data_dir / "audit.jsonl"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    return [e for e in events if e["event"] == "grpc"]


def test_a_second_server_on_a_taken_grpc_port_exits_naming_it(tmp_path: Path) -> None:
    grpc_port = free_port()

    def config(name: str) -> Path:
        return nidaan_config(
            tmp_path / f"{name}.toml",
            port=free_port(),
            data_dir=tmp_path / name / "data",
            models=MODELS,
            extra=(
                f'[grpc]\nbind = "127.0.0.1"\nport = {grpc_port}\n'
                f'[http]\nbind = "127.0.0.1"\nport = {free_port()}\n'
            ),
        )

    first = start_nidaan(config("first"), tmp_path / "first.log", http=True)
    second = None
    try:
        wait_for_port(grpc_port, timeout=120, proc=first)
        second = subprocess.Popen(
            [str(NIDAAN), "--config", str(config("second")), "serve"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = second.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("a second server on the taken gRPC port kept running")
        assert second.returncode != 0
        messages = [line for line in err.splitlines() if line.startswith("nidaan: error:")]
        assert len(messages) == 1, err
        assert f":{grpc_port}" in messages[0] and "grpc.port" in messages[0], messages[0]
        assert "Traceback" not in err
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=30) as client:
            for _ in range(6):  # every call reaches the one server there is
                assert [m.name for m in client.list_models().models] == ["ct_nodule", "cxr_screen"]
        assert first.poll() is None
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
        stop(first)


def test_every_call_is_counted_and_audited_also_past_the_concurrency_limit(
    tmp_path: Path,
) -> None:
    # Each radiograph waits 1 s in its model's queue for company that never comes (a batch
    # needs 16): two calls fill the limit, the rest of those sent at once are refused.
    cfg = make_config(tmp_path)
    cfg.models.repository = _repository_with_delay(tmp_path, 1_000_000, "[ 16 ]")
    cfg.grpc.max_concurrent_rpcs = 2
    cfg.http.bind, cfg.http.port = "127.0.0.1", free_port()
    server = _serve(cfg, http=True)
    try:
        assert server.api is not None
        image = _bytes(synthetic_cxr(60, rows=300, columns=300)[0])
        calls = 10
        outcomes: list[str] = []
        lock = threading.Lock()
        with Client(f"127.0.0.1:{server.api.port}") as client:

            def call() -> None:
                try:
                    client.analyze([image])
                    outcome = "OK"
                except NidaanError as exc:
                    outcome = str(exc).split(":")[0]
                with lock:
                    outcomes.append(outcome)

            threads = [threading.Thread(target=call) for _ in range(calls)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert len(outcomes) == calls
        seen = Counter(outcomes)
        assert seen["RESOURCE_EXHAUSTED"] >= 1 and seen["OK"] >= 2, seen
        counted = _grpc_counts(cfg.http.port)
        assert sum(counted.values()) == calls, counted
        assert counted == seen
        audited = _audited(cfg)
        assert len(audited) == calls
        assert Counter(e["code"] for e in audited) == seen
        refused = [e for e in audited if e["code"] == "RESOURCE_EXHAUSTED"]
        assert all(e["method"] == "Analyze" and e["study"] is None for e in refused)
        assert server.api.slots.in_flight == 0
    finally:
        server.stop()


def test_a_call_that_ends_while_it_waits_is_counted_and_gives_its_slot_back(
    tmp_path: Path,
) -> None:
    # One worker: the first call holds it while it waits for room in grpc.max_inflight_mb
    # (held by the test, as a burst of calls would hold it); the second waits for the worker,
    # and its deadline passes meanwhile. It must be counted, and its slot must come back, or the
    # server would refuse one call more for ever.
    cfg = make_config(tmp_path)
    cfg.grpc.max_concurrent_rpcs = 2
    cfg.grpc.workers = 1
    server = _serve(cfg)
    try:
        assert server.api is not None
        budget = server.api.service.budget
        image = _bytes(synthetic_cxr(61, rows=300, columns=300)[0])
        with Client(f"127.0.0.1:{server.api.port}") as client:
            assert budget.try_acquire(budget.limit)
            slow = threading.Thread(target=client.analyze, args=([image],))
            slow.start()
            wait_until(
                lambda: server.api.slots.in_flight == 1, 30, "the first call waiting for memory"
            )
            with pytest.raises(NidaanError, match="DEADLINE_EXCEEDED"):
                client.analyze([image], timeout_s=0.3)
            budget.release(budget.limit)
            slow.join(30)
            # Both slots are free again: two calls at once are both served.
            outcomes: list[int] = []

            def call() -> None:
                outcomes.append(len(client.analyze([image]).results))

            pair = [threading.Thread(target=call) for _ in range(2)]
            for t in pair:
                t.start()
            for t in pair:
                t.join(30)
            assert outcomes == [1, 1]
        codes = Counter(e["code"] for e in _audited(cfg))
        assert codes == {"OK": 3, "CANCELLED": 1}, codes
        assert server.api.slots.in_flight == 0
    finally:
        server.stop()


def _reasons(quarantine: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(quarantine.glob("*.json"))]


def test_quarantine_keeps_at_most_the_per_call_cap(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.grpc.max_quarantine_mb = 1
    server = _serve(cfg)
    try:
        assert server.api is not None
        quarantine = server.spool.quarantine_dir
        big = GARBAGE * 3000  # about 3 MB
        with Client(f"127.0.0.1:{server.api.port}") as client:
            for _ in range(3):
                with pytest.raises(InputError, match="INVALID_ARGUMENT: instance 0: not a read"):
                    client.analyze([big])
            assert list(quarantine.glob("*.dcm")) == [], "bytes over the cap were kept"
            reasons = _reasons(quarantine)
            assert len(reasons) == 3
            for r in reasons:
                assert r["reason"].startswith("instance 0: not a readable DICOM data set")
                assert r["status"] == "gRPC INVALID_ARGUMENT"
                assert r["size"] == len(big) and r["kept"] is False
                assert "exceed the quarantine limit of 1048576" in r["not_kept"]
            with pytest.raises(InputError, match="INVALID_ARGUMENT"):
                client.analyze([GARBAGE])  # under the cap: kept, as before
            (kept,) = quarantine.glob("*.dcm")
            assert kept.read_bytes() == GARBAGE
            assert len(client.list_models().models) == 2  # and it goes on serving
    finally:
        server.stop()


def test_quarantine_stops_at_min_free_bytes_for_both_entrances(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    # More than the disk has: nothing may be written to quarantine now, but reasons.
    cfg.dicom.min_free_bytes = shutil.disk_usage(tmp_path).free * 2
    server = _serve(cfg)
    try:
        assert server.api is not None
        quarantine = server.spool.quarantine_dir
        with Client(f"127.0.0.1:{server.api.port}") as client:
            with pytest.raises(InputError, match="INVALID_ARGUMENT: instance 0: not a read"):
                client.analyze([GARBAGE])
            good = synthetic_cxr(62, rows=300, columns=300)[0]
            assert len(client.analyze([_bytes(good)]).results) == 1  # it goes on serving
        ds = synthetic_cxr(63, rows=64, columns=64)[0]
        status = send_raw(server.scp.port, GARBAGE, ds.SOPClassUID, ds.SOPInstanceUID)
        assert status is not None and status.Status == 0xA900  # refused as before: no UIDs
        assert list(quarantine.glob("*.dcm")) == []
        reasons = _reasons(quarantine)
        assert {r["status"] for r in reasons} == {"gRPC INVALID_ARGUMENT", "0xA900"}
        for r in reasons:
            assert r["kept"] is False and r["size"] >= len(GARBAGE)
            assert f"less than {cfg.dicom.min_free_bytes} bytes free" in r["not_kept"]
    finally:
        server.stop()
