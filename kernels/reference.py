"""Plain NumPy reference of the preprocessing, for tests only (slow, obviously correct)."""

from __future__ import annotations

import numpy as np

from .geometry import Placement, taps
from .pixel_math import VOI_LINEAR_EXACT, VOI_SIGMOID
from .transform import PixelTransform


def display(src: np.ndarray, t: PixelTransform) -> np.ndarray:
    """Stored values to display values in [0, 1], vectorised, following PS3.3 C.11."""
    x = src.astype(np.float64) * t.slope + t.intercept
    if t.window_centre is None or t.window_width is None:
        lo, hi = x.min(), x.max()
        c, w = (lo + hi) / 2.0 + 0.5, max(hi - lo + 1.0, 1.0)
    else:
        c, w = t.window_centre, t.window_width
    if t.voi_code == VOI_SIGMOID:
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif t.voi_code == VOI_LINEAR_EXACT:
        y = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    elif w <= 1.0:
        y = (x >= c - 0.5).astype(np.float64)
    else:
        y = np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    return 1.0 - y if t.invert else y


def _resample_matrix(n_src: int, n_out: int) -> np.ndarray:
    start, count, weights = taps(n_src, n_out)
    m = np.zeros((n_out, n_src))
    for o in range(n_out):
        for k in range(count[o]):
            m[o, start[o] + k] = weights[o, k]
    return m


def preprocess_one(
    src: np.ndarray, t: PixelTransform, p: Placement, pad: float, mean: float, std: float
) -> np.ndarray:
    """One image to a normalised float32 model input of shape (out_height, out_width)."""
    d = display(src, t)
    ry = _resample_matrix(p.src_height, p.height)
    rx = _resample_matrix(p.src_width, p.width)
    out = np.full((p.out_height, p.out_width), pad, dtype=np.float64)
    out[p.offset_y : p.offset_y + p.height, p.offset_x : p.offset_x + p.width] = ry @ d @ rx.T
    return ((out - mean) / std).astype(np.float32)
