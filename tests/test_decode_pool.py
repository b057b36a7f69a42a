"""Compressed pixel data decoded in worker processes: the same pixels as in process, and a codec
that crashes or hangs costs one image, never the server."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array

from nidaan.core.errors import DecodeError
from nidaan.server.decode import decode
from nidaan.server.decode_pool import DecodePool, is_compressed, pixel_module

from factory import sample_file

pytestmark = pytest.mark.peers  # starts worker processes


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    p = DecodePool(workers=2, timeout_s=60)
    p.start()
    yield p
    p.close()


def test_jpeg2000_decoded_in_a_worker_equals_the_in_process_decode(pool: DecodePool) -> None:
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    assert is_compressed(ds)
    image = decode(ds, pool)
    expected = pixel_array(ds, correct_unused_bits=False)
    assert image.pixels.shape == (1955, 1841)
    np.testing.assert_array_equal(image.pixels, expected)


def test_only_the_pixel_module_crosses_to_the_worker() -> None:
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    module = pixel_module(ds)
    assert "PatientName" in ds and "PatientName" not in module
    assert "PatientID" not in module and "StudyInstanceUID" not in module
    assert module.Rows == ds.Rows and module.PixelData == ds.PixelData


def test_native_pixel_data_never_goes_to_the_pool() -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    assert not is_compressed(ds)
    closed = DecodePool(workers=1)
    closed.close()  # a pool that would refuse any work
    assert decode(ds, closed).pixels.shape == (128, 128)


def test_a_worker_killed_mid_decode_costs_a_retry_not_the_image(pool: DecodePool) -> None:
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    workers_before = set(_worker_pids(pool))
    restarts = pool.restarts

    def kill_a_worker() -> None:
        time.sleep(0.1)  # the decode (about 0.4 s) is under way
        os.kill(sorted(workers_before)[0], signal.SIGKILL)

    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(decode(ds, pool).pixels))]
    threads.append(threading.Thread(target=kill_a_worker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert pool.restarts == restarts + 1  # the broken pool was replaced
    assert len(results) == 1 and results[0].shape == (1955, 1841)  # and the image decoded
    assert not workers_before & set(_worker_pids(pool))  # by new workers


def test_a_decode_past_the_time_limit_fails_that_image_and_the_next_one_decodes() -> None:
    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    pool = DecodePool(workers=1, timeout_s=0.05)  # a 0.4 s decode overruns it
    try:
        pool.start()
        with pytest.raises(DecodeError, match="longer than 0.05 s"):
            decode(ds, pool)
        assert pool.restarts == 1
        pool.timeout_s = 60
        assert decode(ds, pool).pixels.shape == (1955, 1841)
    finally:
        pool.close()


def test_corrupt_codestream_is_a_decode_error_naming_the_transfer_syntax(pool: DecodePool) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(sample_file("RG1_J2KR.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    with pytest.raises(DecodeError, match=r"1\.2\.840\.10008\.1\.2\.4\.90.*cannot be decoded"):
        decode(ds, pool)


def _worker_pids(pool: DecodePool) -> list[int]:
    executor = pool._executor()
    return [p.pid for p in executor._processes.values()]  # type: ignore[union-attr]


def test_workers_exit_when_the_server_is_killed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A ``kill -9`` of the server must not leave its decoder processes behind as orphans."""
    import subprocess
    import sys

    script = (
        "import os, time\n"
        "from nidaan.server.decode_pool import DecodePool\n"
        "p = DecodePool(workers=2); p.start()\n"
        "print(' '.join(str(q.pid) for q in p._executor()._processes.values()), flush=True)\n"
        "time.sleep(600)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in server.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "decoder processes outlived the server"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
