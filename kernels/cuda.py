"""CUDA kernels: one launch preprocesses a whole batch of images of any sizes.

One thread computes one output pixel of one image (``blockIdx.z`` is the image) for every
channel: it gathers its source taps, reads each source word once, maps it through ``pixel_math``
(the helpers the CPU kernels inline too) for all the channels' windows, resamples, normalises and
stores float32 or float16.

Everything a batch needs travels in one packed buffer (:func:`pack`): the images' stored words
back to back, a descriptor row per image (offsets, sizes, bits, padding), the folded window
coefficients, and the taps and lookup tables. Nothing is cached between batches, so no table can
ever belong to another image. :mod:`nidaan.kernels.executor` owns the buffers, streams and
launches.

Kernels are specialised by channel count and pixel mode (:data:`MODES`), so the inner loops carry
no per-tap branch; index arithmetic is 32-bit (the batch's pixel region is below 2**31 words).
Nothing here runs without a GPU except under Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``),
which the tests use; ``tests/test_cuda_kernels.py`` also compiles every variant to PTX and checks
it with ``ptxas``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from .pixel_math import (
    is_padding,
    linear_display,
    padding_key,
    sigmoid_display,
    stored_bits,
    stored_float,
    stored_int,
)

# Bound once: Numba's simulator swaps this module's ``cuda`` for a fake while a kernel runs, and
# the executor may compile a kernel for the next batch meanwhile.
_jit = cuda.jit

#: Threads per block: 32 output columns (one warp along a row) by 8 rows.
BLOCK = (32, 8)
#: Output rows per thread (spaced a block's height apart): the image's descriptor, coefficients
#: and horizontal weights are read once for all of them.
ROWS = 4
#: Most channels (VOI windows) one image may have.
MAX_CHANNELS = 4

#: Pixel modes, one kernel each: PLAIN is unsigned, unpadded, LINEAR (the common case).
PLAIN, AFFINE, SIGMOID, TABLE = 0, 1, 2, 3
MODES = {"plain": PLAIN, "affine": AFFINE, "sigmoid": SIGMOID, "table": TABLE}

# Descriptor columns (int32), one row per image.
D_SRC = 0  # first word of the image in the pixel region
D_SRC_W = 1  # source columns
D_OFF_Y = 2  # placement offset (rows)
D_OFF_X = 3  # placement offset (columns)
D_NH = 4  # scaled height
D_NW = 5  # scaled width
D_YI = 6  # itab: ystart[NH], then ycount[NH]
D_XI = 7  # itab: xstart[NW]
D_YW = 8  # ftab: yw[NH, YK]
D_YK = 9  # vertical taps per output row (row stride of yw)
D_XW = 10  # ftab: xw[K, NW], tap-major
D_K = 11  # horizontal taps per output column
D_MASK = 12
D_SIGN = 13
D_SIGNED = 14
D_PAD_LO = 15  # padding keys (uint32 bit patterns)
D_PAD_HI = 16
D_TAB = 17  # ftab: table[C, TABLEN]
D_TABLEN = 18
D_VMIN = 19
N_DESC = 20

#: Byte alignment of each region in a packed buffer.
ALIGN = 256


def _kernel_source(n_ch: int, mode: int, taps: int) -> Any:
    """The batch kernel for ``n_ch`` channels, one pixel mode and ``taps`` horizontal taps per
    output column (0: any number), all three compile-time constants."""
    NCH = n_ch  # noqa: N806 - frozen into the kernel as constants
    MODE = mode  # noqa: N806
    KX = max(taps, 1)  # noqa: N806
    FIXED = taps > 0  # noqa: N806
    u32 = np.uint32
    i32 = np.int32
    f32 = np.float32

    @_jit(device=True, inline=True)
    def tap(raw, wx, part, offset, ca, cb, mask, sign_bit, signed, flip, pad_lo, pad_hi, tab,
            tablen, vmin, ftab, pad_display):  # fmt: skip
        """Add one source word, weighted ``wx``, to every channel's row sum."""
        if MODE == PLAIN:
            v = f32(u32(u32(raw) & u32(mask)))
            for c in range(NCH):
                part[c] += wx * linear_display(v, offset, ca[c], cb[c])
        else:
            x = stored_bits(raw, mask, sign_bit)
            pad = is_padding(padding_key(x, flip), pad_lo, pad_hi)
            if MODE == TABLE:
                idx = min(max(i32(stored_int(x) - vmin), i32(0)), i32(tablen - 1))
                for c in range(NCH):
                    d = ftab[u32(tab + c * tablen + idx)]
                    part[c] += wx * (pad_display if pad else d)
            else:
                v = stored_float(x, signed)
                for c in range(NCH):
                    if MODE == SIGMOID:
                        d = sigmoid_display(v, offset, ca[c], cb[c])
                    else:
                        d = linear_display(v, offset, ca[c], cb[c])
                    part[c] += wx * (pad_display if pad else d)

    def batch_kernel(src, out, desc, coef, itab, ftab, pad_display, mean, inv_std):  # noqa: PLR0913
        j = i32(cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x)
        step = i32(cuda.blockDim.y)
        r = i32(cuda.blockIdx.y * step * ROWS + cuda.threadIdx.y)
        n = i32(cuda.blockIdx.z)
        out_h = i32(out.shape[2])
        if r >= out_h or j >= out.shape[3]:
            return
        pad_norm = (pad_display - mean) * inv_std
        off_y = desc[n, D_OFF_Y]
        jj = i32(j - desc[n, D_OFF_X])
        nh = desc[n, D_NH]
        nw = desc[n, D_NW]
        if jj < 0 or jj >= nw:  # a letterbox column: padding all the way down
            q = i32(0)
            while q < ROWS and r < out_h:
                for c in range(NCH):
                    out[n, c, r, j] = pad_norm
                r = i32(r + step)
                q = i32(q + 1)
            return
        # Everything that depends only on the image and the column, read once for ROWS rows.
        acc = cuda.local.array(NCH, np.float32)
        part = cuda.local.array(NCH, np.float32)
        ca = cuda.local.array(NCH, np.float32)
        cb = cuda.local.array(NCH, np.float32)
        for c in range(NCH):
            ca[c] = coef[n, 1 + 2 * c]
            cb[c] = coef[n, 2 + 2 * c]
        offset = coef[n, 0]
        mask = desc[n, D_MASK]
        sign_bit = desc[n, D_SIGN]
        signed = desc[n, D_SIGNED] != 0
        flip = u32(0x80000000) if signed else u32(0)
        pad_lo = u32(desc[n, D_PAD_LO])
        pad_hi = u32(desc[n, D_PAD_HI])
        tab = desc[n, D_TAB]
        tablen = desc[n, D_TABLEN]
        vmin = desc[n, D_VMIN]
        src_w = desc[n, D_SRC_W]
        yi = desc[n, D_YI]
        yk = desc[n, D_YK]
        xw = i32(desc[n, D_XW] + jj)
        k_taps = desc[n, D_K]
        col = i32(desc[n, D_SRC] + itab[u32(desc[n, D_XI] + jj)])
        # The horizontal weights are the same for every source row: loaded once.
        wxs = cuda.local.array(KX, np.float32)
        if FIXED:
            for k in range(KX):
                wxs[k] = ftab[u32(xw + k * nw)]  # zero for the taps that pad a column
        q = i32(0)
        while q < ROWS and r < out_h:
            i = i32(r - off_y)
            if i < 0 or i >= nh:  # a letterbox row
                for c in range(NCH):
                    out[n, c, r, j] = pad_norm
                r = i32(r + step)
                q = i32(q + 1)
                continue
            for c in range(NCH):
                acc[c] = f32(0.0)
            yc = itab[u32(yi + nh + i)]
            yw = i32(desc[n, D_YW] + i * yk)
            row = i32(col + itab[u32(yi + i)] * src_w)
            # Separable: each source row's taps are summed with the horizontal weights (part),
            # then the row's sum is weighted vertically. While loops: Numba's range() lowering
            # adds a select per iteration that these counted loops do not need.
            t = i32(0)
            while t < yc:
                for c in range(NCH):
                    part[c] = f32(0.0)
                if FIXED:
                    seg = src[u32(row) :]  # one address per row; the unrolled taps add constants
                    for k in range(KX):
                        tap(seg[k], wxs[k], part, offset, ca, cb, mask, sign_bit, signed,
                            flip, pad_lo, pad_hi, tab, tablen, vmin, ftab, pad_display)  # fmt: skip
                else:
                    k = i32(0)
                    while k < k_taps:
                        tap(src[u32(row + k)], ftab[u32(xw + k * nw)], part, offset, ca, cb,
                            mask, sign_bit, signed, flip, pad_lo, pad_hi, tab, tablen, vmin,
                            ftab, pad_display)  # fmt: skip
                        k = i32(k + 1)
                wy = ftab[u32(yw + t)]
                for c in range(NCH):
                    acc[c] += wy * part[c]
                row = i32(row + src_w)
                t = i32(t + 1)
            for c in range(NCH):
                out[n, c, r, j] = (acc[c] - mean) * inv_std
            r = i32(r + step)
            q = i32(q + 1)

    return batch_kernel


#: Horizontal tap counts with a kernel of their own (unrolled); others take the general loop.
FIXED_TAPS = (1, 2, 3, 4, 5, 6, 8, 9)


@functools.cache
def batch_kernel(n_ch: int, mode: int, taps: int = 0) -> Any:
    """The batch kernel (compiled lazily, per argument types) for ``n_ch`` channels, ``mode`` and
    ``taps`` horizontal taps (one of :data:`FIXED_TAPS`, or 0 for any)."""
    if not 1 <= n_ch <= MAX_CHANNELS:
        raise ValueError(f"{n_ch} channels: the CUDA kernels take 1 to {MAX_CHANNELS}")
    if mode not in MODES.values():
        raise ValueError(f"unknown pixel mode {mode}")
    if taps and taps not in FIXED_TAPS:
        raise ValueError(f"no kernel for {taps} fixed taps")
    return _jit(_kernel_source(n_ch, mode, taps))


def taps_of(plan: Any) -> int:
    """The fixed tap count a plan's kernel is specialised for (0: the general loop)."""
    k = int(plan.xtaps[1].shape[0])
    return k if k in FIXED_TAPS else 0


def mode_of(plan: Any) -> int:
    """The kernel mode of an image's plan."""
    if plan.use_table:
        return TABLE
    if plan.sigmoid:
        return SIGMOID
    return PLAIN if plan.plain else AFFINE


def grid_for(height: int, width: int, n: int, block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """Blocks covering ``n`` images' height x width outputs (each thread does ROWS rows)."""
    rows = block[1] * ROWS
    return ((width + block[0] - 1) // block[0], (height + rows - 1) // rows, n)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _i32(v: int) -> int:
    """A uint32 bit pattern (or a small int) as the int32 a descriptor holds."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass(frozen=True)
class Packed:
    """Where each region of a packed batch lies (byte offsets) and its shapes."""

    n: int
    dtype: np.dtype
    src: tuple[int, int]  # (offset, words)
    desc: int
    coef: tuple[int, int]  # (offset, columns)
    itab: tuple[int, int]  # (offset, words)
    ftab: tuple[int, int]  # (offset, words)
    nbytes: int

    def views(self, view: Any, buf: Any) -> tuple[Any, ...]:
        """(src, desc, coef, itab, ftab) as typed views of ``buf`` made by
        ``view(buf, byte_offset, dtype, shape)`` (host or device)."""
        return (
            view(buf, self.src[0], self.dtype, (self.src[1],)),
            view(buf, self.desc, np.dtype(np.int32), (self.n, N_DESC)),
            view(buf, self.coef[0], np.dtype(np.float32), (self.n, self.coef[1])),
            view(buf, self.itab[0], np.dtype(np.int32), (self.itab[1],)),
            view(buf, self.ftab[0], np.dtype(np.float32), (self.ftab[1],)),
        )


def _parts(plan: Any) -> tuple[np.ndarray, ...]:
    ystart, ycount, yw = plan.ytaps
    xstart, xw_t = plan.xtaps
    return ystart, ycount, yw, xstart, xw_t


def layout_of_pack(images: Sequence[np.ndarray], plans: Sequence[Any]) -> Packed:
    """The packed layout of a batch (images of one dtype), without writing anything."""
    dtype = images[0].dtype
    k_max = max(p.xtaps[1].shape[0] for p in plans)
    # Slack after the last image: its last row's padded taps read up to k_max - 1 words past it.
    words = sum(i.size for i in images) + k_max
    n_ch = plans[0].coeffs.shape[0]
    itab = sum(2 * p.ytaps[0].size + p.xtaps[0].size for p in plans)
    ftab = sum(
        p.ytaps[2].size + p.xtaps[1].size + (p.table.size if p.use_table else 0) for p in plans
    )
    src_off = 0
    desc_off = _align(words * dtype.itemsize)
    coef_off = _align(desc_off + len(plans) * N_DESC * 4)
    itab_off = _align(coef_off + len(plans) * (1 + 2 * n_ch) * 4)
    ftab_off = _align(itab_off + max(itab, 1) * 4)
    end = _align(ftab_off + max(ftab, 1) * 4)
    if words >= 1 << 31 or itab >= 1 << 31 or ftab >= 1 << 31:
        raise ValueError("a batch this large does not fit 32-bit indices; send fewer images")
    return Packed(
        len(plans),
        dtype,
        (src_off, words),
        desc_off,
        (coef_off, 1 + 2 * n_ch),
        (itab_off, max(itab, 1)),
        (ftab_off, max(ftab, 1)),
        end,
    )


def _host_view(buf: np.ndarray, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    count = int(np.prod(shape))
    return buf[offset : offset + count * dtype.itemsize].view(dtype).reshape(shape)


def pack(images: Sequence[np.ndarray], plans: Sequence[Any], buf: np.ndarray) -> Packed:
    """Write a batch into ``buf`` (uint8, at least ``layout_of_pack(...).nbytes``).

    Images must share one dtype, in native byte order and C-contiguous; plans must share one
    channel count.
    """
    layout = layout_of_pack(images, plans)
    if buf.nbytes < layout.nbytes:
        raise ValueError(f"staging buffer of {buf.nbytes} bytes < {layout.nbytes} needed")
    src, desc, coef, itab, ftab = layout.views(_host_view, buf)
    s = i = f = 0
    for n, (image, plan) in enumerate(zip(images, plans, strict=True)):
        if image.dtype != layout.dtype:
            raise ValueError(f"one batch mixes {image.dtype} and {layout.dtype} pixels")
        src[s : s + image.size] = image.reshape(-1)
        ystart, ycount, yw, xstart, xw_t = _parts(plan)
        nh, nw = ystart.size, xstart.size
        row = desc[n]
        row[D_SRC] = s
        row[D_SRC_W] = image.shape[1]
        row[D_OFF_Y] = plan.placement.offset_y
        row[D_OFF_X] = plan.placement.offset_x
        row[D_NH] = nh
        row[D_NW] = nw
        row[D_YI] = i
        itab[i : i + nh] = ystart
        itab[i + nh : i + 2 * nh] = ycount
        i += 2 * nh
        row[D_XI] = i
        itab[i : i + nw] = xstart
        i += nw
        row[D_YW] = f
        row[D_YK] = yw.shape[1]
        ftab[f : f + yw.size] = yw.reshape(-1)
        f += yw.size
        row[D_XW] = f
        row[D_K] = xw_t.shape[0]
        ftab[f : f + xw_t.size] = xw_t.reshape(-1)
        f += xw_t.size
        row[D_MASK] = _i32(plan.mask)
        row[D_SIGN] = _i32(plan.sign_bit)
        row[D_SIGNED] = int(plan.signed)
        row[D_PAD_LO] = _i32(plan.pad_lo)
        row[D_PAD_HI] = _i32(plan.pad_hi)
        if plan.use_table:
            row[D_TAB] = f
            row[D_TABLEN] = plan.table.shape[1]
            ftab[f : f + plan.table.size] = plan.table.reshape(-1)
            f += plan.table.size
        else:
            row[D_TAB] = 0
            row[D_TABLEN] = 1
        row[D_VMIN] = plan.vmin
        coef[n, 0] = plan.offset
        coef[n, 1::2] = plan.coeffs[:, 0]
        coef[n, 2::2] = plan.coeffs[:, 1]
        s += image.size
    src[s:] = 0
    return layout
