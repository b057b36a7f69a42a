"""CPU backend: one fused pass per image, Numba ``prange`` over output rows.

For each output row the kernel accumulates the display values of its few source rows (vertical
taps) into a row buffer, reading each source pixel once and applying the whole per-pixel
transform on the way (``pixel_math``), then resamples that buffer horizontally and normalises.
The vertical pass runs over contiguous pixels with no branch inside (loop variants are chosen per
row), so LLVM vectorises it: that loop is where the time goes. Kernels compile lazily on first use
(no eager signatures) and are cached on disk in ``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .pixel_math import (
    display_affine,
    is_padding,
    linear_display,
    padding_key,
    stored_bits,
    stored_float,
    stored_int,
    window_coefficients,
)

_ZERO = np.float32(0.0)


@njit(parallel=True, cache=True)
def resample(  # noqa: PLR0913 - a kernel takes its parameters flat
    src,
    out,
    ystart,
    ycount,
    yw,
    xstart,
    xw_t,
    xfactor,
    off_y,
    off_x,
    mask,
    sign_bit,
    signed,
    offset,
    coeffs,
    sigmoid,
    use_table,
    table,
    vmin,
    flip,
    pad_lo,
    pad_hi,
    pad_display,
    mean,
    inv_std,
):
    """Fill ``out[C, H, W]`` (float32) from ``src[h, w]`` stored values, one channel per coeffs.

    Vertical taps: ``ystart``, ``ycount``, ``yw[out_row, tap]``. Horizontal taps: ``xstart`` and
    ``xw_t[tap, out_col]``, every column with the same tap count (see ``fixed_taps``); ``xfactor``
    is the whole-number shrink factor (2, 4 or 8) when the columns shrink by one, else 0.
    """
    n_ch, out_h, out_w = out.shape
    nh = ystart.shape[0]
    nw = xstart.shape[0]
    src_w = src.shape[1]
    pad_norm = (pad_display - mean) * inv_std
    for r in prange(out_h):
        i = r - off_y
        if i < 0 or i >= nh:
            for c in range(n_ch):
                for j in range(out_w):
                    out[c, r, j] = pad_norm
            continue
        # Room past the row's end for padded taps (their weights are zero).
        acc = np.empty(src_w + xw_t.shape[0], dtype=np.float32)
        for c in range(n_ch):
            a = coeffs[c, 0]
            b = coeffs[c, 1]
            acc[:] = np.float32(0.0)
            for k in range(ycount[i]):
                row = src[ystart[i] + k]
                wy = yw[i, k]
                if use_table:
                    for x in range(src_w):
                        v = stored_bits(row[x], mask, sign_bit)
                        d = table[c, stored_int(v) - vmin]
                        if is_padding(padding_key(v, flip), pad_lo, pad_hi):
                            d = pad_display
                        acc[x] += wy * d
                else:
                    for x in range(src_w):
                        v = stored_bits(row[x], mask, sign_bit)
                        d = display_affine(stored_float(v, signed), offset, a, b, sigmoid)
                        if is_padding(padding_key(v, flip), pad_lo, pad_hi):
                            d = pad_display
                        acc[x] += wy * d
            _store_row(acc, out[c, r], xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std)


@njit(parallel=True, cache=True)
def resample_plain(
    src,
    out,
    ystart,
    ycount,
    yw,
    xstart,
    xw_t,
    xfactor,
    off_y,
    off_x,
    mask,
    offset,
    coeffs,
    pad_display,
    mean,
    inv_std,
):
    """``resample`` for the common case: unsigned pixels in an unsigned array, no padding, LINEAR
    windows, no table.

    A kernel of its own so that LLVM sees nothing but the vectorisable loop.
    """
    n_ch, out_h, out_w = out.shape
    nh = ystart.shape[0]
    nw = xstart.shape[0]
    src_w = src.shape[1]
    pad_norm = (pad_display - mean) * inv_std
    narrow_mask = src.dtype.type(mask)
    for r in prange(out_h):
        i = r - off_y
        if i < 0 or i >= nh:
            for c in range(n_ch):
                for j in range(out_w):
                    out[c, r, j] = pad_norm
            continue
        acc = np.empty(src_w + xw_t.shape[0], dtype=np.float32)
        for c in range(n_ch):
            a = coeffs[c, 0]
            b = coeffs[c, 1]
            acc[:] = np.float32(0.0)
            for k in range(ycount[i]):
                row = src[ystart[i] + k]
                wy = yw[i, k]
                for x in range(src_w):
                    # Masking in the pixels' own unsigned type keeps the vector lanes narrow:
                    # LLVM then converts 16 pixels at a time (twice the speed of int32 lanes).
                    acc[x] += wy * linear_display(
                        np.float32(src.dtype.type(row[x] & narrow_mask)), offset, a, b
                    )
            _store_row(acc, out[c, r], xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std)


@njit(inline="always", cache=True)
def _store_row(acc, o, xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std):
    """Horizontal pass of one output row, normalised as stored; letterbox columns get the pad."""
    out_w = o.shape[0]
    for j in range(off_x):
        o[j] = pad_norm
    for j in range(off_x + nw, out_w):
        o[j] = pad_norm
    if xfactor == 4:
        # Whole-number shrink factors (2048 -> 512 and the like): each output column
        # averages f adjacent columns; a literal stride lets LLVM vectorise the loads.
        q4 = np.float32(0.25) * inv_std
        for j in range(nw):
            s4 = acc[4 * j] + acc[4 * j + 1] + acc[4 * j + 2] + acc[4 * j + 3]
            o[off_x + j] = s4 * q4 - mean * inv_std
    elif xfactor == 2:
        q2 = np.float32(0.5) * inv_std
        for j in range(nw):
            o[off_x + j] = (acc[2 * j] + acc[2 * j + 1]) * q2 - mean * inv_std
    elif xfactor == 8:
        q8 = np.float32(0.125) * inv_std
        for j in range(nw):
            s8 = np.float32(0.0)
            for t in range(8):
                s8 += acc[8 * j + t]
            o[off_x + j] = s8 * q8 - mean * inv_std
    else:
        # General taps, tap-major: each pass over j is a multiply-add over contiguous
        # weights (zero weights pad every output to the same tap count).
        for j in range(nw):
            o[off_x + j] = np.float32(0.0)
        for k in range(xw_t.shape[0]):
            wk = xw_t[k]
            for j in range(nw):
                o[off_x + j] += wk[j] * acc[xstart[j] + k]
        for j in range(nw):
            o[off_x + j] = (o[off_x + j] - mean) * inv_std


@njit(parallel=True, cache=True)
def min_max(src, mask, sign_bit, signed, flip, pad_lo, pad_hi):
    """Smallest and largest stored value of an image (for images without a VOI window).

    Pixel Padding values are not image data (PS3.3 C.7.5.1.1.2) and are left out; an image that
    is all padding gives (lo, hi) with lo > hi.
    """
    lo = np.int64(2**62)
    hi = -np.int64(2**62)
    for r in prange(src.shape[0]):
        rlo = np.int64(2**62)
        rhi = -np.int64(2**62)
        for c in range(src.shape[1]):
            x = stored_bits(src[r, c], mask, sign_bit)
            if is_padding(padding_key(x, flip), pad_lo, pad_hi):
                continue
            v = np.int64(np.int32(x)) if signed else np.int64(x)
            rlo = min(rlo, v)
            rhi = max(rhi, v)
        lo = min(lo, rlo)
        hi = max(hi, rhi)
    return lo, hi


@njit(cache=True)
def build_table(  # noqa: PLR0913
    vmin,
    vmax,
    slope,
    intercept,
    mlut,
    mlut_first,
    use_mlut,
    centre,
    width,
    function,
    vlut,
    vlut_first,
    vlut_scale,
    use_vlut,
    invert,
):
    """Display value of every stored value in [vmin, vmax] through LUT Sequences or windows.

    Modality LUT Sequence (C.11.1.1.1) or rescale, then VOI LUT Sequence (C.11.2.1.1) or the
    window; values outside a LUT's range take its first or last entry.
    """
    n = vmax - vmin + 1
    out = np.empty(n, dtype=np.float32)
    a, b, sigmoid = window_coefficients(1.0, 0.0, centre, width, function, invert)
    for k in range(n):
        v = vmin + k
        if use_mlut:
            m = np.float32(mlut[min(max(v - mlut_first, 0), mlut.shape[0] - 1)])
        else:
            m = np.float32(v * slope + intercept)
        if use_vlut:
            idx = min(max(np.int64(np.floor(m)) - vlut_first, 0), vlut.shape[0] - 1)
            y = np.float32(vlut[idx] * vlut_scale)
            out[k] = np.float32(1.0) - y if invert else y
        else:
            out[k] = display_affine(m, _ZERO, a, b, sigmoid)
    return out
