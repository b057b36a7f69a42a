"""CPU backend: one fused pass per image, Numba ``prange`` over output rows.

For each output row the kernel accumulates the display values of its few source rows (vertical
taps) into a row buffer, reading each source pixel once and applying the whole per-pixel
transform on the way (``pixel_math``), then resamples that buffer horizontally and normalises.
The vertical pass runs over contiguous pixels with no branch inside (loop variants are chosen per
row), so LLVM vectorises it: that loop is where the time goes.

``resample_plain`` (unsigned, unpadded, LINEAR) and ``resample_affine`` (any integer pixels,
Pixel Padding, LINEAR) sum up to four source rows per pass over x and write the row buffer once
(``_fused``); ``resample`` (SIGMOID, lookup tables) adds one source row per pass. Kernels compile
lazily on first use (no eager signatures) and are cached on disk in ``NUMBA_CACHE_DIR``.

The entry points run without the GIL (``nogil=True``): a study's images are prepared on several
threads at once, and a kernel must not stall the associations and the outbox meanwhile. Numba's
``omp`` threading layer is thread-safe for such concurrent launches (``workqueue`` is not).
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
_ONE = np.float32(1.0)
#: Most output rows a ``_fused`` thread takes at a time (with one row buffer for all of them).
_ROWS_PER_BLOCK = 8


@njit(parallel=True, cache=True, nogil=True)
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
            _store_row(
                acc, out[c, r], xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std, _ONE
            )


@njit(cache=True, nogil=True)
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
    windows, no table (``_fused``, the pixels masked in their own type: ``signed`` None)."""
    pix = (src.dtype.type(mask), np.uint32(0), None, np.uint32(0), np.uint32(1), np.uint32(0),
           pad_display)  # fmt: skip
    _fused(src, out, ystart, ycount, yw, xstart, xw_t, xfactor, off_y, off_x, pix, offset,
           coeffs, pad_display, mean, inv_std)  # fmt: skip


@njit(cache=True, nogil=True)
def resample_affine(
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
    flip,
    pad_lo,
    pad_hi,
    offset,
    coeffs,
    pad_display,
    mean,
    inv_std,
):
    """``resample`` for LINEAR windows without a table, any integer pixels (signed, padded):
    ``resample``'s per-pixel math in ``_fused``'s loops."""
    pix = (np.uint32(mask), np.uint32(sign_bit), signed, np.uint32(flip), np.uint32(pad_lo),
           np.uint32(pad_hi), pad_display)  # fmt: skip
    _fused(src, out, ystart, ycount, yw, xstart, xw_t, xfactor, off_y, off_x, pix, offset,
           coeffs, pad_display, mean, inv_std)  # fmt: skip


@njit(parallel=True, cache=True, nogil=True)
def _fused(src, out, ystart, ycount, yw, xstart, xw_t, xfactor, off_y, off_x, pix, offset,
           coeffs, pad_display, mean, inv_std):  # fmt: skip
    """The fused kernels: ``out[C, H, W]`` from ``src[h, w]`` under LINEAR windows.

    Each output row's vertical taps are summed in one pass over x (four source rows at a time,
    summed pairwise so that the dependency chain per pixel stays short), writing the row buffer
    once; equal power-of-two weights (whole-number factors 2, 4, 8) are not multiplied per pixel
    but folded, exactly, into the horizontal pass. Each thread takes blocks of output rows and
    one row buffer for all of them. ``pix`` holds the pixel math's parameters (see ``_pixel``).
    The row loops are functions of their own, not inlined into this one: inlined, each kernel
    took 40-80 s to compile; as functions, about 10 s, at the same speed.
    """
    n_ch, out_h, out_w = out.shape
    nh = ystart.shape[0]
    nw = xstart.shape[0]
    src_w = src.shape[1]
    pad_norm = (pad_display - mean) * inv_std
    # Blocks of rows, at least 64 of them (so that a small output still spreads over 16 threads;
    # Numba's get_num_threads() would make the kernel uncachable).
    per = max(1, min(_ROWS_PER_BLOCK, out_h // 64))
    n_blocks = (out_h + per - 1) // per
    for blk in prange(n_blocks):
        acc = np.empty(src_w + xw_t.shape[0], dtype=np.float32)
        acc[src_w:] = _ZERO  # padded horizontal taps read these, with zero weights
        for r in range(blk * per, min(out_h, (blk + 1) * per)):
            i = r - off_y
            if i < 0 or i >= nh:
                for c in range(n_ch):
                    for j in range(out_w):
                        out[c, r, j] = pad_norm
                continue
            for c in range(n_ch):
                p = pix + (offset, coeffs[c, 0], coeffs[c, 1])
                _row(acc, src, ystart[i], ycount[i], yw[i], p, out[c, r], xstart, xw_t, xfactor,
                     off_x, nw, pad_norm, mean, inv_std)  # fmt: skip


@njit(cache=True)
def _row(acc, src, y0, cnt, wy, p, o, xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std):
    """One output row of one channel: the vertical taps into ``acc``, then ``_store_row``."""
    uniform = _uniform_weight(wy, cnt)
    if uniform > _ZERO:
        k = 0
        while k + 4 <= cnt:
            _sum4(acc, src[y0 + k], src[y0 + k + 1], src[y0 + k + 2], src[y0 + k + 3], p, k > 0)
            k += 4
        if k + 2 <= cnt:
            _sum2(acc, src[y0 + k], src[y0 + k + 1], p, k > 0)
            k += 2
        if k < cnt:
            _wsum1(acc, src[y0 + k], _ONE, p, k > 0)
        ys = uniform
    else:
        k = 0
        while k + 4 <= cnt:
            _wsum4(acc, src[y0 + k], src[y0 + k + 1], src[y0 + k + 2], src[y0 + k + 3], wy[k],
                   wy[k + 1], wy[k + 2], wy[k + 3], p, k > 0)  # fmt: skip
            k += 4
        if k + 2 <= cnt:
            _wsum2(acc, src[y0 + k], src[y0 + k + 1], wy[k], wy[k + 1], p, k > 0)
            k += 2
        if k < cnt:
            _wsum1(acc, src[y0 + k], wy[k], p, k > 0)
        ys = _ONE
    _store_row(acc, o, xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std, ys)


@njit(inline="always", cache=True)
def _uniform_weight(wy, cnt):
    """``1/cnt`` when all ``cnt`` vertical weights equal it and it is a power of two (whole-number
    factors 1, 2, 4, 8), else 0. Such rows are summed unweighted and the weight is applied in the
    horizontal pass: scaling by a power of two is exact, so the result is the same to the bit."""
    if cnt != 1 and cnt != 2 and cnt != 4 and cnt != 8:
        return _ZERO
    w = _ONE / np.float32(cnt)
    for k in range(cnt):
        if wy[k] != w:
            return _ZERO
    return w


@njit(inline="always", cache=True)
def _pixel(row, x, p):
    """Display value of pixel ``x`` of a source row; ``p`` is (mask, sign_bit, signed, flip,
    pad_lo, pad_hi, pad_display, offset, a, b).

    With ``signed`` None (``resample_plain``) the pixels are unsigned, unpadded and masked in
    their own unsigned type, which keeps the vector lanes narrow; ``p[2] is None`` is decided as
    the kernel compiles, so each kernel carries one branch only. Otherwise, ``resample``'s math:
    Bits Stored and sign, the window, then Pixel Padding."""
    if p[2] is None:
        return linear_display(np.float32(row.dtype.type(row[x] & p[0])), p[7], p[8], p[9])
    v = stored_bits(row[x], p[0], p[1])
    d = linear_display(stored_float(v, p[2]), p[7], p[8], p[9])
    if is_padding(padding_key(v, p[3]), p[4], p[5]):
        d = p[6]
    return d


@njit(cache=True)
def _sum4(acc, r0, r1, r2, r3, p, add):
    """``acc[x] (+)= d0 + d1 + d2 + d3`` over four source rows, summed pairwise."""
    if add:
        for x in range(r0.shape[0]):
            acc[x] += (_pixel(r0, x, p) + _pixel(r1, x, p)) + (_pixel(r2, x, p) + _pixel(r3, x, p))
    else:
        for x in range(r0.shape[0]):
            acc[x] = (_pixel(r0, x, p) + _pixel(r1, x, p)) + (_pixel(r2, x, p) + _pixel(r3, x, p))


@njit(cache=True)
def _sum2(acc, r0, r1, p, add):
    if add:
        for x in range(r0.shape[0]):
            acc[x] += _pixel(r0, x, p) + _pixel(r1, x, p)
    else:
        for x in range(r0.shape[0]):
            acc[x] = _pixel(r0, x, p) + _pixel(r1, x, p)


@njit(cache=True)
def _wsum4(acc, r0, r1, r2, r3, w0, w1, w2, w3, p, add):
    """``acc[x] (+)= w0 d0 + w1 d1 + w2 d2 + w3 d3``, summed pairwise."""
    if add:
        for x in range(r0.shape[0]):
            acc[x] += (w0 * _pixel(r0, x, p) + w1 * _pixel(r1, x, p)) + (
                w2 * _pixel(r2, x, p) + w3 * _pixel(r3, x, p)
            )
    else:
        for x in range(r0.shape[0]):
            acc[x] = (w0 * _pixel(r0, x, p) + w1 * _pixel(r1, x, p)) + (
                w2 * _pixel(r2, x, p) + w3 * _pixel(r3, x, p)
            )


@njit(cache=True)
def _wsum2(acc, r0, r1, w0, w1, p, add):
    if add:
        for x in range(r0.shape[0]):
            acc[x] += w0 * _pixel(r0, x, p) + w1 * _pixel(r1, x, p)
    else:
        for x in range(r0.shape[0]):
            acc[x] = w0 * _pixel(r0, x, p) + w1 * _pixel(r1, x, p)


@njit(cache=True)
def _wsum1(acc, r0, w0, p, add):
    if add:
        for x in range(r0.shape[0]):
            acc[x] += w0 * _pixel(r0, x, p)
    else:
        for x in range(r0.shape[0]):
            acc[x] = w0 * _pixel(r0, x, p)


@njit(cache=True)
def _store_row(acc, o, xstart, xw_t, xfactor, off_x, nw, pad_norm, mean, inv_std, ys):
    """Horizontal pass of one output row, normalised as stored; letterbox columns get the pad.

    ``ys`` scales the row buffer: a power of two when its vertical weights were left out
    (``_uniform_weight``), else 1; either way the scaling is exact."""
    out_w = o.shape[0]
    for j in range(off_x):
        o[j] = pad_norm
    for j in range(off_x + nw, out_w):
        o[j] = pad_norm
    # The image's columns as a view indexed from 0: Numba then adds no negative-index select.
    row = o[off_x : off_x + nw]
    if xfactor == 4:
        # Whole-number shrink factors (2048 -> 512 and the like): each output column
        # averages f adjacent columns; a literal stride lets LLVM vectorise the loads.
        q4 = np.float32(0.25) * inv_std * ys
        for j in range(nw):
            s4 = acc[4 * j] + acc[4 * j + 1] + acc[4 * j + 2] + acc[4 * j + 3]
            row[j] = s4 * q4 - mean * inv_std
    elif xfactor == 2:
        q2 = np.float32(0.5) * inv_std * ys
        for j in range(nw):
            row[j] = (acc[2 * j] + acc[2 * j + 1]) * q2 - mean * inv_std
    elif xfactor == 8:
        q8 = np.float32(0.125) * inv_std * ys
        for j in range(nw):
            s8 = np.float32(0.0)
            for t in range(8):
                s8 += acc[8 * j + t]
            row[j] = s8 * q8 - mean * inv_std
    else:
        # General taps, tap-major: each pass over j is a multiply-add over contiguous weights
        # (zero weights pad every output to the same tap count); an unsigned index keeps the
        # negative-index select out of the gather.
        for j in range(nw):
            row[j] = np.float32(0.0)
        for k in range(xw_t.shape[0]):
            wk = xw_t[k]
            ak = acc[k:]
            for j in range(nw):
                row[j] += wk[j] * ak[np.uint64(xstart[j])]
        for j in range(nw):
            row[j] = (row[j] * ys - mean) * inv_std


@njit(parallel=True, cache=True, nogil=True)
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
