"""The serving process's heap (``nidaan.core.heap``): the garbage collector stays out of the way
of calls, and what a burst left in reference cycles still goes once the server is idle."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from test_grpc_api import _bytes

from nidaan.client import Client

from conftest import MODELS
from factory import synthetic_cxr
from peers import free_port, nidaan_config, start_nidaan, stop, wait_for_port, wait_until


def _collections(http_port: int) -> dict[str, float]:
    """``python_gc_collections_total`` by generation, read from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("python_gc_collections_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('generation="')[1].split('"')[0]] = float(value)
    assert set(counts) == {"0", "1", "2"}, text  # the metric is there for an operator to watch
    return counts


def _collections_during_calls(tmp_path: Path, inference: str = "") -> float:
    """Garbage collections in ``nidaan serve`` (its ``[inference]`` section given) while four
    threads make 100 Analyze calls of small radiographs."""
    tmp_path.mkdir()
    grpc_port, http_port = free_port(), free_port()
    config = nidaan_config(
        tmp_path / "nidaan.toml",
        port=free_port(),
        data_dir=tmp_path / "data",
        models=MODELS,
        extra=(
            f'[grpc]\nbind = "127.0.0.1"\nport = {grpc_port}\n'
            f'[http]\nbind = "127.0.0.1"\nport = {http_port}\n[inference]\n{inference}\n'
        ),
    )
    log = tmp_path / "nidaan.log"
    proc = start_nidaan(config, log, http=True)
    try:
        wait_for_port(grpc_port, timeout=120, proc=proc)
        wait_for_port(http_port, timeout=30, proc=proc)
        # The ports open before the codec processes start; the heap is settled after them,
        # just before the ready line.
        wait_until(lambda: "nidaan: AE" in log.read_text(), 120, "the ready line")
        images = [_bytes(synthetic_cxr(seed, rows=300, columns=300)[0]) for seed in range(4)]
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
            client.analyze(images[:1])  # first-call work (kernel caches, sessions) out of the count
            before = _collections(http_port)
            findings: list[int] = []

            def caller(seed: int) -> None:
                for _ in range(25):
                    findings.append(len(client.analyze([images[seed]]).results))

            threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            after = _collections(http_port)
        assert findings == [1] * 100
        return sum(after[generation] - before[generation] for generation in before)
    finally:
        stop(proc)


def test_calls_to_a_serving_process_do_not_set_off_the_garbage_collector(tmp_path: Path) -> None:
    # CPython's collector (gc_young_threshold = 0) collects its youngest generation every 700
    # net allocations, a dozen times or more over these calls (more for larger studies), and
    # the whole heap every hundred of those, each time with every thread stopped. Settled (the
    # default), the calls in flight never reach the raised threshold; the idle releaser
    # (core.heap.HeapReleaser) may collect once or twice between calls.
    assert _collections_during_calls(tmp_path / "cpython", "gc_young_threshold = 0") >= 8
    assert _collections_during_calls(tmp_path / "settled") <= 3


#: A process that settles its heap, makes garbage in a reference cycle holding 64 MiB, and says
#: whether it is still there before and after the releaser ran.
_CYCLE = """
import gc, sys, time, weakref
from nidaan.core.heap import HeapReleaser, settle_heap

settle_heap(50_000)
class Node:
    pass
node = Node()
node.self, node.pixels = node, bytearray(64 << 20)
alive = weakref.ref(node)
del node
kept = [[i] for i in range(5_000)]  # allocations well past CPython's default threshold (700)
print("before", alive() is not None, flush=True)
HeapReleaser(settle_s=0.05).poke()
deadline = time.monotonic() + 10
while alive() is not None and time.monotonic() < deadline:
    time.sleep(0.02)
print("after", alive() is not None, flush=True)
"""


#: The releaser in a process that never settled: it must leave collecting to CPython's own
#: thresholds (a full pass over an unfrozen heap costs tens of milliseconds).
_UNSETTLED = """
import gc, time
from nidaan.core.heap import HeapReleaser

full = gc.get_stats()[2]["collections"]
HeapReleaser(settle_s=0.05).poke()
time.sleep(0.5)
print(gc.get_stats()[2]["collections"] - full)
"""


def test_the_releaser_collects_only_a_settled_heap() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _UNSETTLED], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0"], run.stdout


def test_garbage_in_a_reference_cycle_goes_once_the_server_is_idle() -> None:
    run = subprocess.run([sys.executable, "-c", _CYCLE], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # Settled, the collector left the cycle in place through 5,000 allocations (with the
    # defaults it would have gone at the 700th); the releaser's collection then freed it.
    assert run.stdout.split() == ["before", "True", "after", "False"], run.stdout
