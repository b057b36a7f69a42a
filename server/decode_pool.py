"""Compressed pixel data decoded in worker processes, so that no codec holds the server's GIL.

pylibjpeg's JPEG 2000 decoder (openjpeg) holds the GIL for the whole decode: 438 ms for a
1955 x 1841 chest radiograph, during which every association, analysis worker and the outbox of
the process wait. Here each compressed frame is decoded in one of ``workers`` spawned processes;
the caller's thread waits on a future with the GIL released. Native (uncompressed) pixel data
never comes here: it is a view of the bytes read, decoded in the caller's thread.

A worker that crashes (a codec's segfault on hostile data) or overruns ``timeout_s`` breaks only
that decode: the pool is replaced, work in flight on the old pool is retried once on the new
one, and the image that broke it twice gets a :class:`~nidaan.core.errors.DecodeError` naming
why (:class:`~nidaan.server.worker_pool.WorkerPool`). The server itself never dies with a codec.
"""

from __future__ import annotations

import contextlib

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset

from nidaan.core.errors import DecodeError

from .worker_pool import WorkerPool

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


def _warm() -> None:
    """In each new worker: load the codecs once, before the first image waits for them."""
    import pydicom.pixels  # noqa: F401

    for plugin in ("openjpeg", "libjpeg", "rle"):
        with contextlib.suppress(ImportError):
            __import__(plugin)


class DecodePool(WorkerPool):
    """Worker processes that decode compressed frames; thread-safe; started on first use."""

    def __init__(self, workers: int = 0, timeout_s: float = 60.0) -> None:
        super().__init__(
            workers,
            timeout_s,
            name="decoder",
            what="decoding the pixel data",
            error=DecodeError,
            warm=_warm,
        )

    def first_frame(self, ds: Dataset, frames: int = 1) -> np.ndarray:
        """Decode the first frame of ``ds`` (compressed) in a worker; DecodeError if it breaks
        a worker twice or takes longer than ``timeout_s``. Codec errors are re-raised as is."""
        return self.call(_first_frame, pixel_module(ds), frames)
