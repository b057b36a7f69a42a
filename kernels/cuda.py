"""CUDA backend: numba-cuda kernels on CuPy arrays, with the same per-pixel math as the CPU.

One thread computes one output pixel of one image for every channel: it gathers its source taps,
maps each stored value through ``pixel_math`` (the helpers the CPU kernel inlines too), resamples,
normalises and stores float32 or float16. :class:`CudaPreprocessor` keeps device buffers across
batches, stages each image through pinned host memory and alternates CUDA streams, so copying
image n+1 overlaps the kernel of image n.

Nothing here runs without a GPU except under Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``),
which the tests use; ``tests/test_cuda_kernels.py`` also compiles the kernel to PTX for sm_80 and
sm_90 and checks it with ``ptxas``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numba import cuda

from .pixel_math import display_affine, is_padding, stored_value

#: Threads per block: 32 output columns (one warp along a row) by 8 rows.
BLOCK = (32, 8)


@cuda.jit
def resample_kernel(  # noqa: PLR0913 - a kernel takes its parameters flat
    src,
    out,
    n,
    ystart,
    ycount,
    yw,
    xstart,
    xw_t,
    off_y,
    off_x,
    mask,
    sign_bit,
    coeffs,
    sigmoid,
    use_table,
    table,
    vmin,
    pad_lo,
    pad_hi,
    pad_display,
    mean,
    inv_std,
):
    """out[n, c, r, j] for every channel c, from ``src`` (stored values of one image)."""
    j, r = cuda.grid(2)
    n_ch = out.shape[1]
    if r >= out.shape[2] or j >= out.shape[3]:
        return
    i = r - off_y
    jj = j - off_x
    inside = i >= 0 and i < ystart.shape[0] and jj >= 0 and jj < xstart.shape[0]
    src_w = src.shape[1]
    for c in range(n_ch):
        if not inside:
            out[n, c, r, j] = (pad_display - mean) * inv_std
            continue
        a = coeffs[c, 0]
        b = coeffs[c, 1]
        total = np.float32(0.0)
        for t in range(ycount[i]):
            sy = ystart[i] + t
            part = np.float32(0.0)
            for k in range(xw_t.shape[0]):
                w = xw_t[k, jj]
                x = xstart[jj] + k
                if w != 0 and x < src_w:  # padded taps carry zero weight
                    v = stored_value(src[sy, x], mask, sign_bit)
                    d = table[c, v - vmin] if use_table else display_affine(v, a, b, sigmoid)
                    if is_padding(v, pad_lo, pad_hi):
                        d = pad_display
                    part += w * d
            total += yw[i, t] * part
        out[n, c, r, j] = (total - mean) * inv_std


def grid_for(height: int, width: int) -> tuple[int, int]:
    """Blocks covering a height x width output."""
    return ((width + BLOCK[0] - 1) // BLOCK[0], (height + BLOCK[1] - 1) // BLOCK[1])


def kernel_args(
    src: Any, out: Any, n: int, plan: Any, tables: tuple[Any, ...], layout: Any
) -> tuple[Any, ...]:
    """The kernel's arguments for one image; ``tables`` are the plan's arrays on the device
    (ystart, ycount, yw, xstart, xw_t, coeffs, table) or, in the simulator, on the host."""
    ystart, ycount, yw, xstart, xw_t, coeffs, table = tables
    i32 = np.int32
    return (
        src,
        out,
        i32(n),
        ystart,
        ycount,
        yw,
        xstart,
        xw_t,
        i32(plan.placement.offset_y),
        i32(plan.placement.offset_x),
        i32(plan.mask),
        i32(plan.sign_bit),
        coeffs,
        plan.sigmoid,
        plan.use_table,
        table,
        i32(plan.vmin),
        i32(max(min(plan.pad_lo, 2**31 - 1), -(2**31))),
        i32(max(min(plan.pad_hi, 2**31 - 1), -(2**31))),
        np.float32(layout.pad_value),
        np.float32(layout.mean),
        np.float32(1.0 / layout.std),
    )


def host_tables(plan: Any) -> tuple[np.ndarray, ...]:
    """The plan's small arrays in the dtypes the kernel takes (int32 indices, float32 weights)."""
    ystart, ycount, yw = plan.ytaps
    xstart, xw_t = plan.xtaps
    return (
        ystart.astype(np.int32),
        ycount.astype(np.int32),
        np.ascontiguousarray(yw, np.float32),
        xstart.astype(np.int32),
        np.ascontiguousarray(xw_t, np.float32),
        np.ascontiguousarray(plan.coeffs, np.float32),
        np.ascontiguousarray(plan.table, np.float32),
    )


class CudaPreprocessor:
    """Device buffers, pinned staging and streams, reused from batch to batch."""

    _shared: CudaPreprocessor | None = None
    _lock = threading.Lock()

    def __init__(self, streams: int = 2) -> None:
        import cupy as cp

        self.cp = cp
        self.streams = [cp.cuda.Stream(non_blocking=True) for _ in range(streams)]
        self._pinned: list[Any] = [None] * streams
        self._pinned_bytes = [0] * streams
        self._device: list[Any] = [None] * streams
        self._tables: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._out: Any = None

    @classmethod
    def shared(cls) -> CudaPreprocessor:
        """One preprocessor per process (device buffers are worth keeping)."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def _stage(self, s: int, image: np.ndarray) -> Any:
        """Copy ``image`` through stream ``s``'s pinned buffer to its device buffer (async)."""
        cp = self.cp
        if self._pinned_bytes[s] < image.nbytes:
            self._pinned[s] = cp.cuda.alloc_pinned_memory(image.nbytes)
            self._device[s] = cp.empty(image.nbytes, dtype=cp.uint8)
            self._pinned_bytes[s] = image.nbytes
        host = np.frombuffer(self._pinned[s], dtype=image.dtype, count=image.size)
        np.copyto(host.reshape(image.shape), image)
        dev = self._device[s][: image.nbytes].view(image.dtype).reshape(image.shape)
        dev.set(host.reshape(image.shape), stream=self.streams[s])
        return dev

    def _device_tables(self, plan: Any, stream: Any) -> tuple[Any, ...]:
        key = tuple(id(a) for a in (*plan.ytaps, *plan.xtaps)) + (id(plan.coeffs), id(plan.table))
        tables = self._tables.get(key)
        if tables is None:
            with stream:
                tables = tuple(self.cp.asarray(a) for a in host_tables(plan))
            if len(self._tables) > 256:
                self._tables.clear()
            self._tables[key] = tables
        return tables

    def run(self, images: Any, plans: Any, layout: Any, out: Any = None) -> Any:
        """Preprocess a batch into ``out`` (a CuPy array, allocated or reused if None)."""
        cp = self.cp
        shape = layout.shape(len(images))
        dtype = np.dtype(layout.dtype)
        if out is None:
            if self._out is None or self._out.shape != shape or self._out.dtype != dtype:
                self._out = cp.empty(shape, dtype=dtype)
            out = self._out
        for n, (image, plan) in enumerate(zip(images, plans, strict=True)):
            s = n % len(self.streams)
            stream = self.streams[s]
            stream.synchronize()  # its staging buffers are free again
            image = np.ascontiguousarray(image)
            if not image.dtype.isnative:
                image = image.astype(image.dtype.newbyteorder("="))
            src = self._stage(s, image)
            args = kernel_args(src, out, n, plan, self._device_tables(plan, stream), layout)
            resample_kernel[
                grid_for(layout.height, layout.width), BLOCK, cuda.external_stream(stream.ptr)
            ](*args)
        for stream in self.streams:
            stream.synchronize()
        return out
