"""Resize geometry: where a source image lands in the model input, and the resampling taps.

Resampling is separable: each output row (and column) is a weighted sum of a few source rows
(columns). Shrinking uses area averaging (each output pixel averages the source area it covers,
with fractional edge weights); enlarging uses bilinear interpolation with pixel centres aligned.
The taps are computed once per image on the host and read by every backend's kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import njit


@dataclass(frozen=True)
class Placement:
    """Where a ``src_height`` x ``src_width`` image lands in the model input.

    The scaled image occupies rows ``[offset_y, offset_y + height)`` and columns
    ``[offset_x, offset_x + width)`` of the ``out_height`` x ``out_width`` input; the rest is
    padding.
    """

    src_height: int
    src_width: int
    out_height: int
    out_width: int
    offset_y: int
    offset_x: int
    height: int
    width: int

    @classmethod
    def fit(
        cls, src_height: int, src_width: int, out_height: int, out_width: int, mode: str
    ) -> Placement:
        """Letterbox (keep aspect, centre, pad) or stretch (fill) the source into the output."""
        if min(src_height, src_width, out_height, out_width) < 1:
            raise ValueError(f"cannot resize {src_height}x{src_width} to {out_height}x{out_width}")
        if mode == "stretch":
            return cls(src_height, src_width, out_height, out_width, 0, 0, out_height, out_width)
        if mode != "letterbox":
            raise ValueError(f"resize mode {mode!r} is neither 'letterbox' nor 'stretch'")
        scale = min(out_height / src_height, out_width / src_width)
        h = min(out_height, max(1, round(src_height * scale)))
        w = min(out_width, max(1, round(src_width * scale)))
        return cls(
            src_height,
            src_width,
            out_height,
            out_width,
            (out_height - h) // 2,
            (out_width - w) // 2,
            h,
            w,
        )

    @property
    def scale_y(self) -> float:
        """Source rows per output row."""
        return self.src_height / self.height

    @property
    def scale_x(self) -> float:
        """Source columns per output column."""
        return self.src_width / self.width

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Map a point in model-input coordinates (corner origin) to the source image."""
        sx = (x - self.offset_x) * self.scale_x
        sy = (y - self.offset_y) * self.scale_y
        return (min(max(sx, 0.0), float(self.src_width)), min(max(sy, 0.0), float(self.src_height)))


@functools.lru_cache(maxsize=64)
def taps(n_src: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resampling taps for one axis: (start, count, weights[n_out, max_taps]), weights sum to 1.

    Cached: a stream of same-sized images reuses its taps (treat the arrays as read-only).
    """
    if n_src < 1 or n_out < 1:
        raise ValueError(f"cannot resample {n_src} pixels to {n_out}")
    out = _taps(n_src, n_out)
    for arr in out:
        arr.flags.writeable = False
    return out


@njit(cache=True)
def _taps(n_src: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = n_src / n_out
    start = np.zeros(n_out, dtype=np.int64)
    count = np.zeros(n_out, dtype=np.int64)
    if scale > 1.0:
        # Area averaging: output pixel o covers source interval [o*scale, (o+1)*scale).
        max_taps = int(math.ceil(scale)) + 1
        weights = np.zeros((n_out, max_taps), dtype=np.float64)
        for o in range(n_out):
            lo, hi = o * scale, min((o + 1) * scale, float(n_src))
            first = int(math.floor(lo))
            last = min(int(math.ceil(hi)), n_src)
            k = 0
            for s in range(first, last):
                w = min(hi, s + 1.0) - max(lo, float(s))
                if w > 1e-12:
                    if k == 0:
                        start[o] = s
                    weights[o, k] = w
                    k += 1
            count[o] = k
            total = weights[o, :k].sum()
            for q in range(k):
                weights[o, q] /= total
        return start, count, weights
    # Bilinear: output pixel centre o + 0.5 maps to source position (o + 0.5) * scale - 0.5.
    weights = np.zeros((n_out, 2), dtype=np.float64)
    for o in range(n_out):
        pos = min(max((o + 0.5) * scale - 0.5, 0.0), n_src - 1.0)
        s0 = min(int(math.floor(pos)), n_src - 1)
        frac = pos - s0
        start[o] = s0
        if frac > 1e-12 and s0 + 1 < n_src:
            count[o] = 2
            weights[o, 0] = 1.0 - frac
            weights[o, 1] = frac
        else:
            count[o] = 1
            weights[o, 0] = 1.0
    return start, count, weights
