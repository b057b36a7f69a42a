"""Compressed pixel data decoded in worker processes, so that no codec holds the server's GIL.

pylibjpeg's JPEG 2000 decoder (openjpeg) holds the GIL for the whole decode: 438 ms for a
1955 x 1841 chest radiograph, during which every association, analysis worker and the outbox of
the process wait. Here each compressed frame is decoded in one of ``workers`` spawned processes;
the caller's thread waits on a future with the GIL released. Native (uncompressed) pixel data
never comes here: it is a view of the bytes read, decoded in the caller's thread.

A worker that crashes (a codec's segfault on hostile data) or overruns ``timeout_s`` breaks only
that decode: the pool is replaced, work in flight on the old pool is retried once on the new
one, and the image that broke it twice gets a :class:`~nidaan.core.errors.DecodeError` naming
why. The server itself never dies with a codec.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset

from nidaan.core.errors import DecodeError

log = logging.getLogger("nidaan.decode")

#: Groups the codec needs besides the pixel data: Image Pixel (0028,xxxx) and the frame tables
#: of the Pixel Data group (7FE0,0001/0002 Extended Offset Table, PS3.5 A.4).
_PIXEL_GROUPS = (0x0028, 0x7FE0)


def is_compressed(ds: Dataset) -> bool:
    """Whether the pixel data is encapsulated (PS3.5 A.4), so a codec must decode it."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return bool(ts is not None and ts.is_encapsulated)


def pixel_module(ds: Dataset) -> Dataset:
    """The part of ``ds`` a codec reads: what crosses to the worker (no patient data)."""
    out = Dataset()
    for tag in ds.keys():  # noqa: SIM118 - iterating would convert every element
        if tag.group in _PIXEL_GROUPS:
            out[tag] = ds[tag]  # reads a value left on disk (deferred) here, in the caller
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    return out


def _first_frame(ds: Dataset, frames: int) -> np.ndarray:
    """In the worker: the first frame's stored values (the kernels mask unused bits)."""
    from pydicom.pixels import pixel_array

    return pixel_array(ds, index=0 if frames > 1 else None, correct_unused_bits=False)


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

    threading.Thread(target=watch, name="nidaan-decoder-watch", daemon=True).start()


def _worker_init(parent: int) -> None:
    _watch_parent(parent)
    _warm()


def _warm() -> None:
    """In each new worker: load the codecs once, before the first image waits for them."""
    import pydicom.pixels  # noqa: F401

    for plugin in ("openjpeg", "libjpeg", "rle"):
        with contextlib.suppress(ImportError):
            __import__(plugin)


class DecodePool:
    """Worker processes that decode compressed frames; thread-safe; started on first use."""

    def __init__(self, workers: int = 0, timeout_s: float = 60.0) -> None:
        self.workers = workers or len(os.sched_getaffinity(0))
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        #: Pools replaced after a crash or a time-out (for the status page and tests).
        self.restarts = 0

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise DecodeError("the decoder is shut down")
            if self._pool is None:
                # spawn, not fork: the server has threads (and may hold CUDA) when this starts.
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def start(self) -> None:
        """Start the workers now (``nidaan serve`` does, so the first study does not wait)."""
        pool = self._executor()
        for f in [pool.submit(_warm) for _ in range(self.workers)]:
            f.result()

    def _replace(self, broken: ProcessPoolExecutor, why: str) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another thread replaced it already
            self._pool = None
            self.restarts += 1
        log.warning("decoder processes replaced: %s", why)
        # A worker stuck in a codec never returns: kill the processes, do not wait for them.
        for process in list(getattr(broken, "_processes", {}).values()):
            process.kill()
        broken.shutdown(wait=False, cancel_futures=True)
        # The pool's feeder thread may be blocked writing a frame into the pipe the killed
        # workers read, and the pool's manager thread waits for it, at interpreter exit too:
        # Python 3.11.2 (Debian 12) then never exits. Closing this process's end of that pipe
        # fails the write and frees both (what CPython does itself since gh-94777).
        reader = getattr(getattr(broken, "_call_queue", None), "_reader", None)
        if reader is not None:
            with contextlib.suppress(OSError):
                reader.close()

    def first_frame(self, ds: Dataset, frames: int = 1) -> np.ndarray:
        """Decode the first frame of ``ds`` (compressed) in a worker; DecodeError if it breaks
        a worker twice or takes longer than ``timeout_s``. Codec errors are re-raised as is."""
        module = pixel_module(ds)
        for attempt in (1, 2):
            pool = self._executor()
            try:
                future: Future[np.ndarray] = pool.submit(_first_frame, module, frames)
            except (BrokenProcessPool, RuntimeError):  # broken, or shut down by a replace
                self._replace(pool, "a worker died")
                continue
            try:
                return future.result(timeout=self.timeout_s)
            except FutureTimeout:
                self._replace(pool, f"a decode ran past {self.timeout_s:g} s")
                raise DecodeError(
                    f"decoding the pixel data took longer than {self.timeout_s:g} s"
                ) from None
            except BrokenProcessPool:
                # A worker died: maybe with this image, maybe with another. Try once more on a
                # fresh pool, so that an image in flight beside a bad one is not blamed for it.
                self._replace(pool, "a worker died")
                if attempt == 2:
                    raise DecodeError(
                        "the decoder process died while decoding the pixel data"
                    ) from None
        raise DecodeError("the decoder process died while decoding the pixel data")

    def close(self) -> None:
        """Stop the workers (idempotent); later decodes raise DecodeError."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
