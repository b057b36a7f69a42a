"""The accepted association's reactors and socket (pacs_bridge/reactors.py): a PDU read whole
however the network splits it, idle associations that cost (almost) no CPU, and associations
that still end when released."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

from nidaan.pacs_bridge.reactors import WideSocket

from conftest import make_config
from factory import synthetic_cxr
from netutil import c_store


def _wide_pair() -> tuple[WideSocket, socket.socket]:
    ours, theirs = socket.socketpair()
    return WideSocket(Association(AE(), MODE_ACCEPTOR), client_socket=ours), theirs


def test_a_pdu_split_into_many_pieces_is_read_whole_and_in_order() -> None:
    wide, sender = _wide_pair()
    payload = random.Random(7).randbytes(3 << 20)  # a 3 MiB PDU body

    def send() -> None:
        rng, i = random.Random(8), 0
        while i < len(payload):
            n = rng.randint(1, 70_000)
            sender.sendall(payload[i : i + n])
            i += n
            if rng.random() < 0.05:
                time.sleep(0.001)  # the rest arrives later, as on a slow link

    t = threading.Thread(target=send)
    t.start()
    head = wide.recv(6)
    body = wide.recv(len(payload) - 6)
    t.join()
    assert bytes(head + body) == payload
    sender.close()
    wide.socket.close()  # type: ignore[union-attr]


def test_a_connection_closed_mid_pdu_returns_what_arrived() -> None:
    wide, sender = _wide_pair()
    sender.sendall(b"x" * 1000)
    sender.close()
    got = wide.recv(5000)
    # pynetdicom's contract: the bytes read before the end; its caller sees the PDU is short.
    assert bytes(got) == b"x" * 1000
    wide.socket.close()  # type: ignore[union-attr]


_IDLE_SENDER = """
import sys, time
from pynetdicom import AE
ae = AE(ae_title="IDLER")
ae.add_requested_context("1.2.840.10008.1.1")
assocs = [ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="NIDAAN") for _ in range(4)]
assert all(a.is_established for a in assocs), "refused"
print("up", flush=True)
sys.stdin.readline()
for a in assocs:
    a.release()
"""


def test_idle_associations_cost_almost_no_cpu_and_end_when_released(  # type: ignore[no-untyped-def]
    tmp_path: Path, start_server
) -> None:
    """pynetdicom's own reactors poll every millisecond: four idle associations took 0.26 of a
    core of the receiving process here. Waiting for events, they take a few hundredths; the
    bound leaves room for a loaded machine and still fails a polling reactor."""
    server = start_server(make_config(tmp_path))
    idler = subprocess.Popen(
        [sys.executable, "-c", _IDLE_SENDER, str(server.scp.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert idler.stdout is not None and idler.stdin is not None
        assert idler.stdout.readline().strip() == "up"
        me = psutil.Process(os.getpid())
        time.sleep(0.5)
        before, started = me.cpu_times(), time.monotonic()
        time.sleep(3.0)
        after, took = me.cpu_times(), time.monotonic() - started
        cores = (after.user + after.system - before.user - before.system) / took
        assert cores < 0.1, f"four idle associations cost {cores:.3f} of a core"
        idler.stdin.write("\n")
        idler.stdin.flush()
        assert idler.wait(timeout=30) == 0
    finally:
        idler.kill()
    # Each association ended (released, its threads gone) and the SCP serves the next one.
    ds, _ = synthetic_cxr(11, rows=64, columns=64)
    (status,) = c_store(server.scp.port, [ds])
    assert status.Status == 0x0000
