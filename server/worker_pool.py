"""CPU-heavy work in spawned worker processes, so that it holds no GIL of the server's.

The server is one Python process: whatever holds its GIL holds up every association, analysis
worker, gRPC call and the outbox. Two kinds of work are sent here instead, each to a pool of its
own (:mod:`server.decode_pool` for codecs, :mod:`server.result_objects` for the SR, SEG and
presentation states); the caller's thread waits on a future with the GIL released, and the work
runs on every core.

A worker that dies (a codec's segfault on hostile data, the OOM killer) or overruns
``timeout_s`` breaks only the calls on it: the pool is replaced, a call in flight on the old pool
is tried once more on the new one, and a call that breaks a worker twice raises the pool's
``error`` type naming why. The server itself never dies with a worker. Workers exit when the
server does, ``kill -9`` included.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from nidaan.core.errors import NidaanError
from nidaan.core.machine import usable_cores

log = logging.getLogger("nidaan.workers")
T = TypeVar("T")


def _watch_parent(parent: int, every_s: float = 1.0) -> None:
    """In each worker: exit once the server is gone (``kill -9`` included), instead of waiting
    for work for ever as an orphan. The parent's pid is polled rather than asked of the kernel
    (``PR_SET_PDEATHSIG``), because that signal follows the *thread* that started the worker,
    and workers are started from whichever thread submits first."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="nidaan-worker-watch", daemon=True).start()


def _worker_init(parent: int, warm: Callable[[], None]) -> None:
    _watch_parent(parent)
    warm()


def _nothing() -> None:
    return None


class WorkerPool:
    """Spawned worker processes that run module-level functions; thread-safe; started on first
    use; ``workers`` 0 = one per usable core (:func:`~nidaan.core.machine.usable_cores`).
    ``name`` ("decoder") and ``what`` ("decoding the pixel data") make the messages of the
    ``error`` raised when a call cannot complete; ``warm`` runs once in each new worker (imports,
    so the first call does not pay for them)."""

    def __init__(
        self,
        workers: int = 0,
        timeout_s: float = 60.0,
        *,
        name: str,
        what: str,
        error: type[NidaanError],
        warm: Callable[[], None] = _nothing,
    ) -> None:
        self.workers = workers or usable_cores()
        self.timeout_s = timeout_s
        self._name = name
        self._what = what
        self._error = error
        self._warm = warm
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        #: Pools replaced after a crash or a time-out (for the status page and tests).
        self.restarts = 0

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise self._error(f"the {self._name} is shut down")
            if self._pool is None:
                # spawn, not fork: the server has threads (and may hold CUDA) when this starts.
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(os.getpid(), self._warm),
                )
            return self._pool

    def start(self) -> None:
        """Start the workers now (``nidaan serve`` does, so the first call does not wait)."""
        pool = self._executor()
        for f in [pool.submit(self._warm) for _ in range(self.workers)]:
            f.result()

    def _replace(self, broken: ProcessPoolExecutor, why: str) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another thread replaced it already
            self._pool = None
            self.restarts += 1
        log.warning("%s processes replaced: %s", self._name, why)
        # A worker stuck in native code never returns: kill the processes, do not wait.
        for process in list(getattr(broken, "_processes", {}).values()):
            process.kill()
        broken.shutdown(wait=False, cancel_futures=True)
        # The pool's feeder thread may be blocked writing a call into the pipe the killed
        # workers read, and the pool's manager thread waits for it, at interpreter exit too:
        # Python 3.11.2 (Debian 12) then never exits. Closing this process's end of that pipe
        # fails the write and frees both (what CPython does itself since gh-94777).
        reader = getattr(getattr(broken, "_call_queue", None), "_reader", None)
        if reader is not None:
            with contextlib.suppress(OSError):
                reader.close()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker (both must pickle); the pool's error if the call breaks a
        worker twice or takes longer than ``timeout_s``. What ``fn`` raises is re-raised as is."""
        died = f"the {self._name} process died while {self._what}"
        for attempt in (1, 2):
            pool = self._executor()
            try:
                future: Future[T] = pool.submit(fn, *args)
            except (BrokenProcessPool, RuntimeError):  # broken, or shut down by a replace
                self._replace(pool, "a worker died")
                continue
            try:
                return future.result(timeout=self.timeout_s)
            except FutureTimeout:
                self._replace(pool, f"a call ran past {self.timeout_s:g} s")
                raise self._error(f"{self._what} took longer than {self.timeout_s:g} s") from None
            except BrokenProcessPool:
                # A worker died: maybe with this call, maybe with another. Try once more on a
                # fresh pool, so that a call in flight beside a bad one is not blamed for it.
                self._replace(pool, "a worker died")
                if attempt == 2:
                    raise self._error(died) from None
        raise self._error(died)

    def close(self) -> None:
        """Stop the workers (idempotent); later calls raise the pool's error."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
