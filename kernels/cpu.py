"""CPU backend: one fused pass per image with Numba ``prange`` over output rows.

Each output pixel gathers its source taps, maps each stored value to a display value
(``pixel_math.display_value``), resamples, normalises and writes float32: the source pixels are
read once. Kernels compile lazily on first use (no eager signatures) and are cached on disk in
``NUMBA_CACHE_DIR`` when that is set.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .pixel_math import display_value


@njit(parallel=True, cache=True)
def _resample_normalise(  # noqa: PLR0913 - a kernel takes its parameters flat
    src,
    out,
    ystart,
    ycount,
    yw,
    xstart,
    xcount,
    xw,
    off_y,
    off_x,
    slope,
    intercept,
    centre,
    width,
    function,
    invert,
    pad,
    mean,
    std,
):
    out_h, out_w = out.shape
    nh = ystart.shape[0]
    nw = xstart.shape[0]
    pad_norm = (pad - mean) / std
    for r in prange(out_h):
        i = r - off_y
        for c in range(out_w):
            j = c - off_x
            if i < 0 or i >= nh or j < 0 or j >= nw:
                out[r, c] = pad_norm
                continue
            acc = 0.0
            for a in range(ycount[i]):
                sy = ystart[i] + a
                wy = yw[i, a]
                row = 0.0
                for b in range(xcount[j]):
                    v = display_value(
                        float(src[sy, xstart[j] + b]),
                        slope,
                        intercept,
                        centre,
                        width,
                        function,
                        invert,
                    )
                    row += xw[j, b] * v
                acc += wy * row
            out[r, c] = (acc - mean) / std


@njit(parallel=True, cache=True)
def _min_max(src):
    lo = np.inf
    hi = -np.inf
    # A reduction over rows; prange combines the per-thread min/max.
    for r in prange(src.shape[0]):
        rlo = np.inf
        rhi = -np.inf
        for c in range(src.shape[1]):
            v = float(src[r, c])
            rlo = min(rlo, v)
            rhi = max(rhi, v)
        lo = min(lo, rlo)
        hi = max(hi, rhi)
    return lo, hi


def min_max(src: np.ndarray) -> tuple[float, float]:
    """Smallest and largest stored value of an image."""
    lo, hi = _min_max(src)
    return float(lo), float(hi)


def resample_normalise(
    src: np.ndarray,
    out: np.ndarray,
    yt,
    xt,
    off_y: int,
    off_x: int,
    slope: float,
    intercept: float,
    centre: float,
    width: float,
    function: int,
    invert: bool,
    pad: float,
    mean: float,
    std: float,
) -> None:
    """Fill ``out`` (a 2-D float32 view into the batch) from ``src`` in one fused pass."""
    _resample_normalise(
        src,
        out,
        yt[0],
        yt[1],
        yt[2],
        xt[0],
        xt[1],
        xt[2],
        off_y,
        off_x,
        slope,
        intercept,
        centre,
        width,
        function,
        invert,
        pad,
        mean,
        std,
    )
