"""The heap of Nidaan's long-running processes: the cyclic garbage collector's settings, glibc's
arenas, and giving memory back after a burst.

CPython collects its youngest generation after 700 more container objects are made than freed,
and the whole heap once enough objects have survived. A serving process holds thousands of
objects in flight at any moment (the data sets of the calls and studies it is working on), so
those counts are reached by live objects, not garbage, and every full collection scans what the
process built at start (models, modules, configuration), which is never garbage either.
Measured in ``nidaan serve`` under 16 gRPC callers (docs/configuration.md, "gRPC memory and
overhead"): 1,367-1,433 collections in 15 s found 14 objects in all, and each full
collection held the interpreter lock for about 115 ms, stalling every thread.
:func:`settle_heap` takes the collector out of the way of serving; garbage in reference cycles
still goes when allocations cross its raised threshold, and :class:`HeapReleaser` collects when
the server goes idle, when no call waits for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable


def settle_heap(young_threshold: int) -> None:
    """Call once a long-running process has started: collect once, keep what it holds now out
    of every later collection (``gc.freeze``), and collect the youngest generation after
    ``young_threshold`` net allocations instead of 700 (``inference.gc_young_threshold``; 0
    changes nothing)."""
    if young_threshold == 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Two glibc malloc arenas, not eight per core: each thread's arena keeps what a burst of
    calls freed, and the server's RSS then stays at the burst's peak (what MALLOC_ARENA_MAX=2
    does, set here through ``mallopt`` before the threads start, so no one has to export it)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return  # the operator chose; glibc read it at start
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX (glibc malloc.h)


class HeapReleaser:
    """Gives freed memory back a moment after the process went idle (:meth:`poke`), in its own
    thread and at most once a second: where the heap was settled, collects garbage in reference
    cycles (which :func:`settle_heap` leaves longer in place under load), then asks glibc to
    return free pages to the system (``malloc_trim``).

    Why: what a burst of calls held is freed when they end, but glibc keeps freed memory in its
    arenas and would hold the burst's peak for ever. Without glibc (musl, macOS) only the
    collection runs.
    """

    def __init__(self, settle_s: float = 1.0) -> None:
        """``settle_s``: how long to wait after a poke, for the burst's last calls to finish."""
        self.settle_s = settle_s
        self._event = threading.Event()
        self._trim = _malloc_trim()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def poke(self) -> None:
        """The process has just gone idle: release what it freed, soon."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nidaan-heap-release", daemon=True
                )
                self._thread.start()
        self._event.set()

    def _run(self) -> None:
        while True:
            self._event.wait()
            time.sleep(self.settle_s)
            self._event.clear()
            if gc.get_freeze_count():
                # Settled, what is left to scan is small (0.5 ms measured in a server after
                # 100 calls, against 77 ms for its whole heap): cheap even once a second.
                # Unsettled, CPython's own thresholds collect, and a full pass would cost more.
                gc.collect()
            if self._trim is not None:
                self._trim(0)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        # The process's own symbols (the C library it runs on); no ldconfig lookup, which
        # would start a process.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
